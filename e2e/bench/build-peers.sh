#!/usr/bin/env bash
# Builds the Go peer consumers of the side-by-side benchmark (e2e/bench/peers/) into OUTDIR:
#   OUTDIR/kpipe-peer-seed   sarama, ConsumePartition per partition, goroutine per record (or -pool N)
#   OUTDIR/kpipe-peer-franz  franz-go (kgo) consumer group
# The Go module (go.mod/go.sum with the pinned sarama and franz-go) lives in a throwaway folder outside the repo,
# so the peers never become a dependency of kpipe. Idempotent: does nothing when OUTDIR already holds binaries built
# from the same sources (stamp file). Needs the Go toolchain and the Go module proxy (or a warm module cache).
# Usage: e2e/bench/build-peers.sh OUTDIR
set -euo pipefail

SARAMA_VERSION=v1.61.1
FRANZ_VERSION=v1.22.3

log() { echo "build-peers: $*" >&2; }
die() { echo "build-peers: ERROR: $*" >&2; exit 1; }

[[ $# -eq 1 && -n $1 ]] || die "usage: $0 OUTDIR"
peers_dir="$(cd "$(dirname "$0")" && pwd)/peers"
[[ -f $peers_dir/seed/main.go && -f $peers_dir/franz/main.go ]] || die "peer sources not found under $peers_dir"
mkdir -p "$1"
outdir="$(cd "$1" && pwd)"

# Hash of the Go sources (relative paths + contents) and the pinned module versions.
hash="$(
  cd "$peers_dir"
  {
    echo "sarama=$SARAMA_VERSION franz-go=$FRANZ_VERSION"
    find . -name '*.go' -type f | LC_ALL=C sort | while read -r f; do
      echo "$f"
      sha256sum <"$f"
    done
  } | sha256sum | cut -c1-16
)"

stamp="$outdir/.kpipe-bench-peers.stamp"
if [[ -x $outdir/kpipe-peer-seed && -x $outdir/kpipe-peer-franz && -f $stamp && "$(cat "$stamp")" == "$hash" ]]; then
  log "up to date: $outdir/kpipe-peer-{seed,franz} (sources $hash)"
  exit 0
fi

command -v go >/dev/null 2>&1 || die "the Go toolchain ('go') is not on PATH; install Go >= 1.22 to build the benchmark peers"
go version >/dev/null 2>&1 || die "'go version' failed; the Go toolchain is broken"
# Never pick up a go.work from elsewhere, never switch toolchains behind our back.
export GOWORK=off GOTOOLCHAIN=local

build_root="${KPIPE_BENCH_BUILD:-${XDG_CACHE_HOME:-$HOME/.cache}/kpipe/bench-peers}"
src="$build_root/src-$hash"
log "sources $hash -> $src ($(go version))"

if [[ ! -f $src/.ready ]]; then
  rm -rf "$src"
  mkdir -p "$src/seed" "$src/franz"
  cp "$peers_dir/seed/"*.go "$src/seed/"
  cp "$peers_dir/franz/"*.go "$src/franz/"
  (
    cd "$src"
    log "go mod init kpipe-bench-peers"
    go mod init kpipe-bench-peers || die "go mod init failed in $src"
    log "go get github.com/IBM/sarama@$SARAMA_VERSION github.com/twmb/franz-go@$FRANZ_VERSION"
    go get "github.com/IBM/sarama@$SARAMA_VERSION" "github.com/twmb/franz-go@$FRANZ_VERSION" ||
      die "go get failed: is the Go module proxy reachable? (GOPROXY=$(go env GOPROXY))"
    log "go mod tidy"
    go mod tidy || die "go mod tidy failed: is the Go module proxy reachable? (GOPROXY=$(go env GOPROXY))"
    # The requested versions must survive tidy (it could only raise them via another requirement).
    for want in "github.com/IBM/sarama $SARAMA_VERSION" "github.com/twmb/franz-go $FRANZ_VERSION"; do
      got="$(go list -m "${want% *}")"
      [[ $got == "$want" ]] || die "expected module $want, got $got"
    done
    log "gofmt -l / go vet"
    unformatted="$(gofmt -l .)"
    [[ -z $unformatted ]] || die "gofmt: not formatted: $unformatted"
    go vet ./... || die "go vet failed"
  )
  touch "$src/.ready"
else
  log "module dir already prepared"
fi

(
  cd "$src"
  log "go build -> $outdir/kpipe-peer-seed"
  go build -trimpath -o "$outdir/kpipe-peer-seed.tmp" ./seed || die "go build ./seed failed"
  log "go build -> $outdir/kpipe-peer-franz"
  go build -trimpath -o "$outdir/kpipe-peer-franz.tmp" ./franz || die "go build ./franz failed"
)
mv -f "$outdir/kpipe-peer-seed.tmp" "$outdir/kpipe-peer-seed"
mv -f "$outdir/kpipe-peer-franz.tmp" "$outdir/kpipe-peer-franz"
echo "$hash" >"$stamp"
log "built $outdir/kpipe-peer-seed and $outdir/kpipe-peer-franz (sources $hash)"

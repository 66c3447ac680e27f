#!/usr/bin/env bash
# Builds etcd $ETCD_VERSION from the Go module proxy through a tiny wrapper module whose main calls
# etcdmain.Main (go install of go.etcd.io/etcd/server/v3 is refused: its go.mod has replace directives).
# Idempotent: output is $KPIPE_CACHE/etcd-<version>/bin/etcd.
source "$(dirname "$0")/lib.sh"
need go
out="$ETCD_BIN"
if [ -x "$out/etcd" ] && [ -f "$out/.complete" ]; then exit 0; fi
start=$(date +%s)
log "building etcd $ETCD_VERSION (wrapper module around go.etcd.io/etcd/server/v3/etcdmain)"
wrap="$KPIPE_CACHE/etcd-$ETCD_VERSION/wrapper"
rm -rf "$wrap"; mkdir -p "$wrap" "$out"
cd "$wrap"
go mod init local.invalid/kpipe-etcd >/dev/null 2>&1
cat > main.go <<'GO'
// Command etcd is the upstream etcd server CLI, built from the published Go modules.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" || die "go get go.etcd.io/etcd/server/v3@$ETCD_VERSION failed"
go mod tidy
CGO_ENABLED=0 go build -trimpath \
  -ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=module-$ETCD_VERSION" -o "$out/etcd" . \
  || die "etcd build failed"
"$out/etcd" --version | matches "${ETCD_VERSION#v}" || die "built etcd does not report $ETCD_VERSION"
touch "$out/.complete"
log "etcd $ETCD_VERSION built in $(( $(date +%s) - start ))s (cached in $out)"

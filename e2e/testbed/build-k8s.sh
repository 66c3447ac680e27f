#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager and kubectl from the k8s.io/kubernetes Go module
# through a wrapper module. The replace directives are derived from upstream's go.mod as served by
# the module proxy (never a hand-kept list), and the binaries are version-stamped.
# Idempotent: a finished build is reused; output goes to $KPIPE_CACHE/k8s-<version>/bin.
# Usage: build-k8s.sh [command...]   (default: the bed's three; the kind node image also asks for kubelet, kubeadm,
# kube-scheduler and kube-proxy). Each finished binary gets a stamp <bin>/.complete-<command>; `.complete` marks the
# bed's default set (up.sh checks it).
source "$(dirname "$0")/lib.sh"
need go
out="$K8S_BIN"
default_cmds=(kube-apiserver kube-controller-manager kubectl)
cmds=("$@")
[ $# -gt 0 ] || cmds=("${default_cmds[@]}")
missing=()
for c in "${cmds[@]}"; do
  # the bed's default set was stamped as a whole by older versions of this script
  if [ -x "$out/$c" ] && { [ -f "$out/.complete-$c" ] || { [ -f "$out/.complete" ] \
       && printf '%s\n' "${default_cmds[@]}" | matches "^$c$"; }; }; then continue; fi
  missing+=("$c")
done
[ ${#missing[@]} -gt 0 ] || exit 0
start=$(date +%s)
log "building Kubernetes $K8S_VERSION: ${missing[*]} (cold build: this takes a while on 2 cores)"
staging="v0.${K8S_VERSION#v1.}"
wrap="$KPIPE_CACHE/k8s-$K8S_VERSION/wrapper-$(printf '%s\n' "${missing[@]}" | sha256sum | cut -c1-12)"
rm -rf "$wrap"; mkdir -p "$wrap" "$out"
cd "$wrap"
go mod init local.invalid/kpipe-k8sbins >/dev/null 2>&1
upstream_mod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
[ -f "$upstream_mod" ] || die "could not fetch k8s.io/kubernetes@$K8S_VERSION go.mod from the module proxy"
mods=$(sed -n 's|^[[:space:]]*\(k8s.io/[^[:space:]]*\) => ./staging/src/.*|\1|p' "$upstream_mod")
[ -n "$mods" ] || die "no staging replace directives found in upstream go.mod ($upstream_mod)"
args=()
for m in $mods; do args+=("-replace=$m=$m@$staging"); done
go mod edit "${args[@]}"
godebug=$(sed -n 's/^godebug[[:space:]]\{1,\}\([a-z].*=.*\)$/\1/p' "$upstream_mod" | head -1)
[ -n "$godebug" ] && go mod edit -godebug="$godebug"
go mod edit -require="k8s.io/kubernetes@$K8S_VERSION"
{
  printf '//go:build tools\n\npackage tools\n\nimport (\n'
  for c in "${missing[@]}"; do printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "$c"; done
  printf ')\n'
} > tools.go
log "resolving modules ($(echo "$mods" | wc -w) staging replaces derived from upstream go.mod)"
go mod tidy
minor=$(echo "$K8S_VERSION" | cut -d. -f2)
ld="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ld="$ld -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
  ld="$ld -X $p.gitCommit=0000000000000000000000000000000000000000 -X $p.buildDate=1970-01-01T00:00:00Z"
done
log "compiling ${missing[*]}"
pkgs=()
for c in "${missing[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$c"); done
CGO_ENABLED=0 go build -trimpath -tags selinux,notest,grpcnotrace -ldflags "$ld" -o "$out/" "${pkgs[@]}"
"$out/${missing[0]}" --version 2>&1 | matches "$K8S_VERSION" || die "${missing[0]} is not stamped with $K8S_VERSION"
for c in "${missing[@]}"; do touch "$out/.complete-$c"; done
all_default=yes
for c in "${default_cmds[@]}"; do [ -f "$out/.complete-$c" ] || all_default=no; done
[ "$all_default" = no ] || touch "$out/.complete"
rm -rf "$wrap"
log "Kubernetes $K8S_VERSION built in $(( $(date +%s) - start ))s (cold build time; cached in $out)"

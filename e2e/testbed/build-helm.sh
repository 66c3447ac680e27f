#!/usr/bin/env bash
# Installs helm $HELM_VERSION from its Go module (no replace directives, so plain go install works), with the
# same version stamps as helm's Makefile, including the default Kubernetes version (1.34) used by offline
# `helm template`/`helm lint`. Idempotent: output is $KPIPE_CACHE/helm-<version>/bin/helm.
source "$(dirname "$0")/lib.sh"
need go
out="$HELM_BIN"
if [ -x "$out/helm" ] && [ -f "$out/.complete" ]; then exit 0; fi
start=$(date +%s)
log "building helm $HELM_VERSION (go install helm.sh/helm/v3/cmd/helm)"
mkdir -p "$out"
minor=$(echo "$K8S_VERSION" | cut -d. -f2)
ld="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
ld="$ld -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
ld="$ld -X helm.sh/helm/v3/internal/version.gitCommit=0000000000000000000000000000000000000000"
for p in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
  ld="$ld -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$minor"
done
GOBIN="$out" CGO_ENABLED=0 go install -trimpath -ldflags "$ld" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" \
  || die "go install helm.sh/helm/v3/cmd/helm@$HELM_VERSION failed"
"$out/helm" version --short | matches "$HELM_VERSION" || die "built helm does not report $HELM_VERSION"
touch "$out/.complete"
log "helm $HELM_VERSION built in $(( $(date +%s) - start ))s (cached in $out)"

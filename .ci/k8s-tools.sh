#!/usr/bin/env bash
# Make `kubectl kustomize` available for tests/k8s (the overlays are rendered by kubectl itself).
#
#   bash .ci/k8s-tools.sh        # installs Debian's kubernetes-client if kubectl is missing, then checks it
#
# The check renders a tiny kustomization that uses a Component (kustomize >= 3.7, kubectl >= 1.21), as
# k8s/overlays do. Debian 12's kubernetes-client is kubectl 1.20, whose embedded kustomize (v2.0.3)
# predates components: where that is all there is, this script says so and fails, rather than letting
# the tests fail later with a less obvious message. Progress goes to stderr. Runs as root (CI).
set -euo pipefail

log() { echo "k8s-tools.sh: $*" >&2; }

if ! command -v kubectl >/dev/null 2>&1; then
  log "kubectl not found; installing Debian's kubernetes-client"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update >&2
  apt-get install -y --no-install-recommends kubernetes-client >&2
fi

log "$(kubectl version --client 2>/dev/null | tr '\n' ' ')"

probe="$(mktemp -d)"
trap 'rm -rf "$probe"' EXIT
mkdir -p "$probe/base" "$probe/component" "$probe/overlay"
printf 'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: probe}\ndata: {a: "1"}\n' > "$probe/base/cm.yaml"
printf 'resources: [cm.yaml]\n' > "$probe/base/kustomization.yaml"
printf 'apiVersion: kustomize.config.k8s.io/v1alpha1\nkind: Component\npatches:\n- patch: |\n    apiVersion: v1\n    kind: ConfigMap\n    metadata: {name: probe}\n    data: {b: "2"}\n' \
  > "$probe/component/kustomization.yaml"
printf 'resources: [../base]\ncomponents: [../component]\n' > "$probe/overlay/kustomization.yaml"

if ! out="$(kubectl kustomize "$probe/overlay" 2>&1)" || ! grep -q 'b: "2"' <<<"$out"; then
  log "this kubectl cannot render kustomize components (needs kubectl >= 1.21): $out"
  log "put a kubectl >= 1.21 on PATH (the CI machine image ships one as /usr/bin/kubectl) and rerun"
  exit 1
fi
log "kubectl kustomize renders components: ok"

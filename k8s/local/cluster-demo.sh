#!/usr/bin/env bash
# `make cluster-demo`: the Kubernetes flow's commands, on a local Ray head instead of KubeRay.
#
#   KubeRay                                   here
#   RayCluster / RayService head          ->  ray start --head
#   RayService serveConfigV2              ->  serve deploy (the dev variant of serve/config.yaml)
#   RayJob running `python -m tune.job`   ->  ray job submit --working-dir . -- python -m tune.job batch.yaml
#   a client                              ->  curl POST /v1/images/generations with a tenant key
#
# Everything lands in $CT2I_DEMO_OUT (default cluster-demo-out/). The head is stopped on exit, and only
# this head: its processes are found by their private temp dir.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT="${CT2I_DEMO_OUT:-$ROOT/cluster-demo-out}"
HTTP_PORT="${CT2I_DEMO_HTTP_PORT:-8000}"
DASHBOARD_PORT="${CT2I_DEMO_DASHBOARD_PORT:-8265}"
GCS_PORT="${CT2I_DEMO_GCS_PORT:-6380}"
STEPS="${CT2I_DEMO_STEPS:-4}"
PY="$ROOT/.venv/bin/python"
export PATH="$ROOT/.venv/bin:$PATH"
export CT2I_HOME="$OUT/home"
export RAY_AUTH_MODE=disabled                        # loopback-only demo head; docs/operators.md keeps auth on
export RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S=120
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/ct2i-torch-extensions}"
unset RAY_ADDRESS
step() { echo "[cluster-demo] $*"; }

rm -rf "$OUT"
mkdir -p "$OUT"
RAY_TMP="$(mktemp -d /tmp/ct2i-ray-XXXXXX)"
stop_head() {
  pkill -TERM -f "$RAY_TMP" 2>/dev/null || true
  sleep 2
  pkill -KILL -f "$RAY_TMP" 2>/dev/null || true
  rm -rf "$RAY_TMP"
}
trap stop_head EXIT

# Logical CPUs: the Serve replicas (1.5) and two 1-CPU tuning workers must fit at once.
step "ray start --head (dashboard http://127.0.0.1:$DASHBOARD_PORT)"
ray start --head --node-ip-address 127.0.0.1 --port "$GCS_PORT" --dashboard-host 127.0.0.1 \
  --dashboard-port "$DASHBOARD_PORT" --num-cpus 4 --disable-usage-stats --temp-dir "$RAY_TMP" >"$OUT/ray-start.log" 2>&1

step "serve deploy (serve/config.yaml, dev variant, on 127.0.0.1:$HTTP_PORT)"
"$PY" -m k8s.serve_config --variant dev | "$PY" -c "
import sys, yaml
config = yaml.safe_load(sys.stdin)
config['http_options'].update(host='127.0.0.1', port=$HTTP_PORT)
yaml.safe_dump(config, sys.stdout, sort_keys=False)" >"$OUT/serve-config.yaml"
serve deploy --address "http://127.0.0.1:$DASHBOARD_PORT" "$OUT/serve-config.yaml"

step "a two-tenant batch: ray job submit -- python -m tune.job"
"$PY" - "$OUT" "$STEPS" <<'PYTHON'
import sys
from pathlib import Path

import yaml

from causalt2i.data.synthetic import write_synthetic_spec

out, steps = Path(sys.argv[1]), int(sys.argv[2])
specs = [write_synthetic_spec(out / "batch" / tenant, tenant=tenant, name=name, steps=steps, gpus_per_worker=0,
                              images_per_subject=2, seed=seed)
         for tenant, name, seed in (("acme", "pets", 0), ("globex", "toys", 1))]
(out / "batch" / "batch.yaml").write_text(yaml.safe_dump({"jobs": [str(p.relative_to(out / "batch")) for p in specs]}))
PYTHON
ray job submit --address "http://127.0.0.1:$DASHBOARD_PORT" --working-dir "$ROOT" \
  --runtime-env-json "{\"env_vars\": {\"CT2I_HOME\": \"$CT2I_HOME\", \"TORCH_EXTENSIONS_DIR\": \"$TORCH_EXTENSIONS_DIR\"}}" \
  -- python -m tune.job "$OUT/batch/batch.yaml" --create-tenants

step "a client: acme's key, then POST /v1/images/generations"
KEY="$(ct2i keys create --tenant acme --label cluster-demo --json | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["key"])')"
for _ in $(seq 1 120); do
  curl -fsS "http://127.0.0.1:$HTTP_PORT/healthz" >/dev/null 2>&1 && break
  sleep 2
done
curl -fsS "http://127.0.0.1:$HTTP_PORT/v1/images/generations" \
  -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \
  -d '{"model": "acme/pets", "prompt": "a <s1> cat and a <v1> dog in a garden", "size": "64x64", "response_format": "b64_json", "steps": 4, "seed": 0}' \
  >"$OUT/response.json"
"$PY" -c "
import base64, json, sys
data = json.load(open('$OUT/response.json'))['data'][0]['b64_json']
open('$OUT/acme-pets.png', 'wb').write(base64.b64decode(data))"
step "image from acme's adapter: $OUT/acme-pets.png"

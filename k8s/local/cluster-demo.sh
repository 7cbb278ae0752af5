#!/usr/bin/env bash
# `make cluster-demo`: the Kubernetes flow's commands, on a local Ray head instead of KubeRay.
#
#   KubeRay                                   here
#   RayCluster / RayService head          ->  ray start --head
#   RayService serveConfigV2              ->  serve deploy (the dev variant of serve/config.yaml)
#   RayJob running `python -m ct2i.job`   ->  ray job submit --working-dir . -- python -m ct2i.job batch.yaml
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
# The head's dashboard agent serves the job API on this port. Ray's default (52365) is taken by any other Ray
# on this machine (a `ray.init()` session too), and an agent that cannot bind it never registers: every
# submission is then refused with "No available agent to submit job".
AGENT_PORT="${CT2I_DEMO_AGENT_PORT:-52366}"
STEPS="${CT2I_DEMO_STEPS:-4}"
PY="$ROOT/.venv/bin/python"
export PATH="$ROOT/.venv/bin:$PATH"
export CT2I_HOME="$OUT/home"
# Ray token auth stays on, as on KubeRay: `ray start`, `serve deploy`, `ray job submit` and the job's driver all
# read this demo's own token (RAY_AUTH_TOKEN_PATH, a file only this user can read, made below).
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="$OUT/ray-auth-token"
unset RAY_AUTH_TOKEN
export RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S=120
# Ray 2.60 turns `--node-ip-address 127.0.0.1` into the machine's routable address, and its GCS, raylet and
# agents then listen on every interface, unless its one-machine switch is off (see ct2i/cli_serve.py,
# LOCAL_ONLY_RAY_VARIABLE). The demo's head takes no other nodes, so it stays on loopback; checked below.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
unset RAY_ADDRESS
step() { echo "[cluster-demo] $*"; }

# Remove only a folder an earlier run made (it holds the marker), never a user's own folder.
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
  if [ -L "$OUT" ] || [ ! -f "$OUT/.ct2i-demo" ] || [ -L "$OUT/.ct2i-demo" ]; then
    step "refusing to remove $OUT: the cluster demo did not create it (no .ct2i-demo marker); choose another CT2I_DEMO_OUT"
    exit 2
  fi
  rm -rf "$OUT"
fi
mkdir -p "$OUT"
echo "made by k8s/local/cluster-demo.sh; a later run removes this folder" > "$OUT/.ct2i-demo"
(umask 077 && "$PY" -c 'import secrets; print(secrets.token_hex(32))' > "$RAY_AUTH_TOKEN_PATH")
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
  --dashboard-port "$DASHBOARD_PORT" --dashboard-agent-listen-port "$AGENT_PORT" --num-cpus 4 --disable-usage-stats --temp-dir "$RAY_TMP" >"$OUT/ray-start.log" 2>&1

# The head refuses a client whose token is wrong (HTTP 403 from the dashboard, the same check the GCS makes).
RAY_AUTH_TOKEN=not-the-token ray job list --address "http://127.0.0.1:$DASHBOARD_PORT" >"$OUT/wrong-token.log" 2>&1 || true
if ! grep -q "Authentication failed" "$OUT/wrong-token.log"; then
  step "the head did not refuse a wrong Ray token: $OUT/wrong-token.log"
  exit 1
fi
step "Ray token auth on: a client with a wrong token is refused"

step "serve deploy (serve/config.yaml, dev variant, on 127.0.0.1:$HTTP_PORT)"
"$PY" -m k8s.serve_config --variant dev | "$PY" -c "
import sys, yaml
config = yaml.safe_load(sys.stdin)
config['http_options'].update(host='127.0.0.1', port=$HTTP_PORT)
yaml.safe_dump(config, sys.stdout, sort_keys=False)" >"$OUT/serve-config.yaml"
serve deploy --address "http://127.0.0.1:$DASHBOARD_PORT" "$OUT/serve-config.yaml"

step "a two-tenant batch: ray job submit -- python -m ct2i.job"
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
# `ray start` returns before the head's job agent has registered; until it has, the job server refuses every
# submission with "No available agent to submit job" (HTTP 500, nothing submitted). That refusal alone is
# retried, with a bounded backoff; any other failure ends the demo.
submit_batch() {
  local log="$OUT/ray-job-submit.log" delay=2 attempt
  for attempt in 1 2 3 4 5 6 7; do
    if ray job submit --address "http://127.0.0.1:$DASHBOARD_PORT" --working-dir "$ROOT" \
        --runtime-env-json "{\"env_vars\": {\"CT2I_HOME\": \"$CT2I_HOME\"}}" \
        -- python -m ct2i.job "$OUT/batch/batch.yaml" --create-tenants 2>&1 | tee "$log"; then
      return 0
    fi
    grep -q "No available agent to submit job" "$log" || return 1
    step "the head's job agent is not ready yet (attempt $attempt); retrying in ${delay} s"
    sleep "$delay"
    delay=$((delay * 2 > 30 ? 30 : delay * 2))
  done
  step "the head's job agent did not become ready in 7 attempts (about 160 s): is the head overloaded? $log has the last refusal"
  return 1
}
submit_batch

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

step "every socket of this Ray (GCS, raylet, agents, workers) on loopback"
"$PY" -m ct2i.listeners --cmdline-contains "$RAY_TMP"

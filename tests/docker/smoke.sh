#!/usr/bin/env bash
# Smoke test of the Docker image on a machine with no Docker registry (see shared/ENVIRONMENT.md):
# start dockerd if needed, build a Debian base with debootstrap, build the image on it, run it, and
# check /health, /ready, the HEALTHCHECK, the non-root user and one /generate. Slow (vfs storage):
# not part of the default test run.
#
#   sudo bash tests/docker/smoke.sh            # the whole smoke test
#   sudo bash tests/docker/smoke.sh --prepare  # only tools, dockerd and the base image
#   sudo bash tests/docker/smoke.sh --rmi      # ... and remove the images at the end
#   sudo bash tests/docker/smoke.sh --ray      # the image built with EXTRAS=ray as a 2-node Ray cluster:
#                                              # a head container (no CPUs) and a worker container, on which
#                                              # `promptserve serve --replicas 1` places its engine replica
#
# Env: TORCH_WHEEL (a local torch wheel to install in the image; default: the CPU wheel in /opt/wheels
# if there is one, else the Dockerfile's default index), SMOKE_TIMEOUT_S (server start, default 300).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
BASE_IMAGE="promptserve-smoke-base:bookworm"
BASE_REV="2"  # bump when build_base changes, so an older base is rebuilt
IMAGE="promptserve:smoke"
CONTAINER="promptserve-smoke"
TIMEOUT_S="${SMOKE_TIMEOUT_S:-300}"
MODE="${1:-}"
WORK="$(mktemp -d /tmp/promptserve-smoke.XXXXXX)"
DOCKERD_PID=""
WHEEL_PID=""

log() { echo "[smoke $(date -u +%H:%M:%S)] $*"; }

cleanup() {
    local rc=$?
    docker rm -f "$CONTAINER" ps-smoke-ray-head ps-smoke-ray-worker >/dev/null 2>&1 || true
    [ -n "$WHEEL_PID" ] && kill "$WHEEL_PID" 2>/dev/null || true
    if [ "$MODE" = "--rmi" ]; then docker rmi -f "$IMAGE" "$BASE_IMAGE" >/dev/null 2>&1 || true; fi
    # Only a dockerd this script started is stopped (by its pid).
    if [ -n "$DOCKERD_PID" ]; then kill "$DOCKERD_PID" 2>/dev/null || true; wait "$DOCKERD_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
    if [ $rc -eq 0 ]; then log "PASS"; else log "FAIL (exit $rc)"; fi
}
trap cleanup EXIT

install_tools() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v curl >/dev/null || missing+=(curl)
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

start_dockerd() {
    if docker info >/dev/null 2>&1; then log "dockerd already running"; return; fi
    log "starting dockerd (vfs storage, no bridge)"
    dockerd --storage-driver=vfs --iptables=false --bridge=none >"/tmp/promptserve-smoke-dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && return; sleep 1; done
    log "dockerd did not start; see /tmp/promptserve-smoke-dockerd.log"; exit 1
}

build_base() {
    local rev; rev="$(docker image inspect -f '{{index .Config.Labels "promptserve.smoke-base"}}' "$BASE_IMAGE" 2>/dev/null || true)"
    if [ "$rev" = "$BASE_REV" ]; then log "base image $BASE_IMAGE exists"; return; fi
    log "debootstrap --variant=minbase bookworm"
    debootstrap --variant=minbase bookworm "$WORK/rootfs" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log"; exit 1; }
    # This machine reaches PyPI through a TLS proxy that only its own CA bundle trusts: the base gets
    # that bundle, and pip in the image is pointed at it.
    mkdir -p "$WORK/rootfs/etc/ssl"
    cp /etc/ssl/certs/ca-certificates.crt "$WORK/rootfs/etc/ssl/host-ca-bundle.crt"
    tar -C "$WORK/rootfs" -c . | docker import --change "ENV PIP_CERT=/etc/ssl/host-ca-bundle.crt" \
        --change "LABEL promptserve.smoke-base=$BASE_REV" - "$BASE_IMAGE" >/dev/null
    rm -rf "$WORK/rootfs"
    log "imported $BASE_IMAGE"
}

# The torch wheel on this disk is offered to the build over loopback (the build uses the host network).
TORCH_ARGS=()
serve_torch_wheel() {
    local wheel="${TORCH_WHEEL:-$(ls /opt/wheels/torch-*+cpu-cp311-*.whl 2>/dev/null | head -1)}"
    [ -n "$wheel" ] || { log "no local torch wheel: the Dockerfile's default index is used"; return 0; }
    # A fixed port keeps the build arg (and so Docker's layer cache for torch) the same between runs.
    local port="${SMOKE_WHEEL_PORT:-38517}"
    python3 -m http.server --bind 127.0.0.1 --directory "$(dirname "$wheel")" "$port" >/dev/null 2>&1 &
    WHEEL_PID=$!
    local name; name="$(basename "$wheel")"
    TORCH_ARGS=(--build-arg "TORCH_REQUIREMENT=torch @ http://127.0.0.1:$port/${name//+/%2B}" --build-arg "TORCH_INDEX_URL=")
    log "torch from the local wheel $name"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

wait_for() {  # wait_for URL SECONDS
    local deadline=$((SECONDS + $2))
    while [ $SECONDS -lt $deadline ]; do
        curl -fsS "$1" >/dev/null 2>&1 && return 0
        docker inspect -f '{{.State.Running}}' "$CONTAINER" 2>/dev/null | grep -q true || { docker logs "$CONTAINER" | tail -30; return 1; }
        sleep 2
    done
    log "timed out waiting for $1"; docker logs "$CONTAINER" | tail -30; return 1
}

build_image() {  # build_image [EXTRAS]
    serve_torch_wheel
    log "docker build (base $BASE_IMAGE${1:+, extras $1})"
    local t0=$SECONDS
    docker build --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" "${TORCH_ARGS[@]}" --build-arg "EXTRAS=${1:-}" \
        -t "$IMAGE" "$ROOT" >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; exit 1; }
    log "built $IMAGE in $((SECONDS - t0)) s: $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"
}

run_and_check() {
    local port; port="$(free_port)"
    mkdir -p "$WORK/prompts" && chown 1000:1000 "$WORK/prompts"
    log "docker run on port $port (flags after the image pass through to promptserve serve)"
    docker run -d --name "$CONTAINER" --network host -e "PROMPTSERVE_PORT=$port" \
        -v "$WORK/prompts:/prompts" "$IMAGE" --max-new-tokens 64 >/dev/null
    local base="http://127.0.0.1:$port"
    wait_for "$base/health" "$TIMEOUT_S"
    log "GET /health -> $(curl -fsS "$base/health")"
    wait_for "$base/ready" "$TIMEOUT_S"
    log "GET /ready -> $(curl -fsS "$base/ready")"
    log "user in container: $(docker exec "$CONTAINER" id -un) (uid $(docker exec "$CONTAINER" id -u))"
    [ "$(docker exec "$CONTAINER" id -u)" != "0" ] || { log "runs as root"; exit 1; }
    local tasks; tasks="$(curl -fsS "$base/v1/tasks")"
    log "GET /v1/tasks -> $tasks"
    local task; task="$(echo "$tasks" | python3 -c 'import json,sys; d=json.load(sys.stdin); d=d.get("tasks", d.get("data", d)) if isinstance(d, dict) else d; print(d[0]["task_id"] if isinstance(d[0], dict) and "task_id" in d[0] else (d[0].get("id") if isinstance(d[0], dict) else d[0]))')"
    local body="{\"task_id\": \"$task\", \"inputs\": \"Hello\", \"parameters\": {\"max_new_tokens\": 8, \"details\": true}}"
    local out; out="$(curl -fsS -H 'Content-Type: application/json' -d "$body" "$base/generate")"
    log "POST /generate $body -> $(echo "$out" | python3 -c "$SUMMARY")"
    # The flag given after the image name (--max-new-tokens 64) reached the server: 65 is refused.
    local code; code="$(curl -s -o "$WORK/too-long.json" -w '%{http_code}' -H 'Content-Type: application/json' \
        -d '{"inputs": "Hello", "parameters": {"max_new_tokens": 65}}' "$base/generate")"
    log "POST /generate with max_new_tokens 65 -> $code $(cat "$WORK/too-long.json")"
    [ "$code" = "422" ]
    log "task files written by the container: $(cd "$WORK/prompts" && find . -type f | sort | tr '\n' ' ')"
    wait_healthy
}

# Checks the /generate answer and prints its gist (the demo model's text is meaningless bytes).
SUMMARY='import json,sys; d=json.load(sys.stdin); t=d["details"]; assert isinstance(d["generated_text"], str); \
assert t["generated_tokens"] >= 1; print({k: t[k] for k in ("finish_reason", "generated_tokens", "prompt_tokens", \
"virtual_tokens", "task_id")}, "text:", repr(d["generated_text"][:40]))'

wait_healthy() {
    local status=""
    for _ in $(seq 60); do
        status="$(docker inspect -f '{{.State.Health.Status}}' "$CONTAINER")"
        [ "$status" = "healthy" ] && break
        sleep 2
    done
    log "docker HEALTHCHECK status: $status"
    [ "$status" = "healthy" ]
}

# The image as Ray nodes: a head container (no CPUs: it gets the proxy, the ingress and the directory,
# never an engine replica) and a worker container (2 CPUs) joined to it, both on the host network, then
# `promptserve serve --replicas 1 --ray-address auto` run in the head: its replica can only go to the
# worker. One /generate through the endpoint, and the replica's process is found in the worker.
ray_nodes_check() {
    local gcs port; gcs="$(free_port)"; port="$(free_port)"
    mkdir -p "$WORK/prompts" && chown 1000:1000 "$WORK/prompts"
    # Ray's token authentication would need the head's token in the worker: off for this local check.
    local common=(--network host -e RAY_AUTH_MODE=disabled -v "$WORK/prompts:/prompts" --entrypoint ray)
    log "ray head (GCS port $gcs) and ray worker containers"
    docker run -d --name ps-smoke-ray-head "${common[@]}" "$IMAGE" start --head --port "$gcs" --num-cpus 0 \
        --include-dashboard false --dashboard-agent-listen-port "$(free_port)" --block >/dev/null
    sleep 10
    docker run -d --name ps-smoke-ray-worker "${common[@]}" "$IMAGE" start --address "127.0.0.1:$gcs" \
        --num-cpus 2 --dashboard-agent-listen-port "$(free_port)" --block >/dev/null
    CONTAINER=ps-smoke-ray-head
    docker exec -d -e RAY_AUTH_MODE=disabled ps-smoke-ray-head sh -c "promptserve serve --replicas 1 \
        --ray-address auto --host 127.0.0.1 --port $port --no-compile > /tmp/serve.log 2>&1"
    local base="http://127.0.0.1:$port"
    wait_for "$base/ready" "$TIMEOUT_S" || { docker exec ps-smoke-ray-head tail -30 /tmp/serve.log; exit 1; }
    log "GET /ready -> $(curl -fsS -D - "$base/ready" | tr -d '\r' | grep -i 'x-promptserve-replicas-live')"
    local task; task="$(curl -fsS "$base/v1/tasks" | python3 -c 'import json,sys; print(json.load(sys.stdin)["tasks"][0]["id"])')"
    local body="{\"task_id\": \"$task\", \"inputs\": \"Hello\", \"parameters\": {\"max_new_tokens\": 8, \"details\": true}}"
    local out; out="$(curl -fsS -D "$WORK/headers" -H 'Content-Type: application/json' -d "$body" "$base/generate")"
    log "POST /generate -> $(echo "$out" | python3 -c "$SUMMARY") $(tr -d '\r' < "$WORK/headers" | grep -i x-promptserve-replica:)"
    # (the image has no ps: read the process titles from /proc)
    local where; where="$(docker exec ps-smoke-ray-worker sh -c \
        'for f in /proc/[0-9]*/cmdline; do tr "\0" " " < "$f"; echo; done | grep -c "[S]erveReplica:promptserve:promptserve-engine"')"
    log "engine replica processes in the worker container: $where"
    [ "$where" -ge 1 ]
}

install_tools
start_dockerd
build_base
[ "$MODE" = "--prepare" ] && exit 0
if [ "$MODE" = "--ray" ]; then
    IMAGE="promptserve:smoke-ray"
    build_image ray
    ray_nodes_check
    exit 0
fi
build_image
run_and_check

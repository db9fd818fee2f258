#!/usr/bin/env bash
# `make docker-test`: builds the CPU image's runtime stage (docker/Dockerfile) for real and runs it.
#
# - The Docker daemon runs without its default bridge: one started here gets `--bridge=none
#   --iptables=false --ip-masq=false`; one already running must have no `bridge` network. Every
#   container uses `--network host` and the build runs with `--network none`, so nothing is sent to
#   172.17.0.0/16 or anywhere but loopback; the server listens on 127.0.0.1 only.
# - No image can be pulled here: the runtime base is Debian bookworm made by debootstrap (with curl,
#   cached in .cache/docker/) and `docker import`ed as hiercon-local/debian:bookworm-slim; the binary
#   (HIERCON_BIN, default target/debug/hiercon, debug info stripped) and the ORT library (.ort/lib) are
#   supplied in the build context through the Dockerfile's BINARY_FROM / ORT_FROM build arguments.
# - Then: `serve` in the image over the demo index (the emoji catalogue indexed with the shipped
#   model, INDEX, default target/contract/emoji, copied into the index volume), the re-index job
#   (docker/reindex.sh) once in the image, and checks of the health check, a search, and a reload.
set -euo pipefail
cd "$(dirname "$0")/.."
DOCKER=${DOCKER:-/usr/bin/docker}
BIN=${HIERCON_BIN:-target/debug/hiercon}
INDEX=${INDEX:-target/contract/emoji}
ORT_VERSION=1.31.1
BASE=hiercon-local/debian:bookworm-slim
TAG=hiercon:docker-test
WORK=$PWD/target/docker-test
ROOTFS=.cache/docker/bookworm-minbase-curl.tar
KEY=docker-test-key
NAME=hiercon-docker-test-$$
DOCKERD_PID=

say() { echo "== $*"; }
fail() { echo "docker-test: $*" >&2; exit 1; }
cleanup() {
    "$DOCKER" rm -f "$NAME" >/dev/null 2>&1 || true
    if [ -n "$DOCKERD_PID" ]; then kill "$DOCKERD_PID" 2>/dev/null || true; wait "$DOCKERD_PID" 2>/dev/null || true; fi
}
trap cleanup EXIT
rm -rf "$WORK" && mkdir -p "$WORK" .cache/docker
[ -x "$BIN" ] || fail "$BIN missing: cargo build"
[ -f "$INDEX/CURRENT" ] || fail "$INDEX has no live generation: make contract-test builds it"

say "the daemon (no default bridge)"
if ! "$DOCKER" info >/dev/null 2>&1; then
    command -v dockerd >/dev/null || fail "dockerd missing: apt-get install docker.io (.ci/run does)"
    dockerd --bridge=none --iptables=false --ip6tables=false --ip-forward=false --ip-masq=false \
        >"$WORK/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 60); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 0.5; done
    "$DOCKER" info >/dev/null 2>&1 || { cat "$WORK/dockerd.log"; fail "dockerd did not start"; }
    echo "   started dockerd (pid $DOCKERD_PID) with --bridge=none --iptables=false"
fi
check_isolation() {
    ! "$DOCKER" network ls --format '{{.Name}}' | grep -qx bridge || fail "the daemon has its default bridge: restart it with --bridge=none"
    ! ip -o addr 2>/dev/null | grep -q ' 172\.17\.' || fail "an interface has an address in 172.17.0.0/16"
    ! ip -o link 2>/dev/null | grep -q 'docker0' || fail "docker0 exists"
    if command -v iptables >/dev/null && iptables -S >/dev/null 2>&1; then
        ! iptables -S | grep -qi 'docker\|172\.17\.' || fail "iptables has Docker rules: $(iptables -S | grep -i 'docker\|172\.17\.')"
        ! iptables -t nat -S | grep -qi 'docker\|172\.17\.' || fail "iptables' nat table has Docker rules"
    fi
}
check_isolation
echo "   networks: $("$DOCKER" network ls --format '{{.Name}}' | tr '\n' ' ')"

say "the base image $BASE"
if ! "$DOCKER" image inspect "$BASE" >/dev/null 2>&1; then
    if [ ! -f "$ROOTFS" ]; then
        command -v debootstrap >/dev/null || fail "debootstrap missing: apt-get install debootstrap (.ci/run does)"
        debootstrap --variant=minbase --include=curl,ca-certificates bookworm "$WORK/rootfs" >"$WORK/debootstrap.log" 2>&1 \
            || { tail -20 "$WORK/debootstrap.log"; fail "debootstrap failed"; }
        rm -rf "$WORK/rootfs/var/cache/apt/archives"/*.deb "$WORK/rootfs/var/lib/apt/lists"/*
        tar -C "$WORK/rootfs" -c . >"$ROOTFS.tmp" && mv "$ROOTFS.tmp" "$ROOTFS"
        rm -rf "$WORK/rootfs"
    fi
    "$DOCKER" import "$ROOTFS" "$BASE" >/dev/null
fi

say "the image $TAG (runtime stage of docker/Dockerfile, binary and ORT supplied, --network none)"
CTX=$WORK/context
mkdir -p "$CTX/supplied/ort" "$CTX/docker"
objcopy --strip-debug "$BIN" "$CTX/supplied/hiercon"
cp ".ort/lib/libonnxruntime.so.$ORT_VERSION" .ort/lib/libonnxruntime_providers_shared.so "$CTX/supplied/ort/"
cp docker/reindex.sh "$CTX/docker/"
DOCKER_BUILDKIT=1 "$DOCKER" build --network none -f docker/Dockerfile -t "$TAG" \
    --build-arg RUNTIME_BASE="$BASE" --build-arg BINARY_FROM=supplied-binary --build-arg ORT_FROM=supplied-ort \
    "$CTX" >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; fail "docker build failed"; }
grep -E '^#[0-9]+ \[' "$WORK/build.log" | awk '!seen[$0]++' | sed 's/^/   /'
"$DOCKER" run --rm --network host "$TAG" runtime | sed 's/^/   /'

say "serve in the image over the demo index"
VOL=$WORK/index
mkdir -p "$VOL"
cp -a "$INDEX" "$VOL/emoji"
chown -R 10001 "$VOL"
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL=http://127.0.0.1:$PORT
MOUNTS=(-v "$VOL:/srv/index" -v "$PWD/data/emoji:/srv/data/catalogue:ro" -v "$PWD/models:/srv/models:ro")
ENVS=(-e HIERCON_INDEX=/srv/index/emoji -e HIERCON_MODEL=/srv/models/emoji-lite0-hmce.onnx -e HIERCON_API_KEY=$KEY)
"$DOCKER" run -d --name "$NAME" --network host --health-interval 2s "${MOUNTS[@]}" "${ENVS[@]}" \
    -e HIERCON_HOST=127.0.0.1 -e HIERCON_PORT="$PORT" -e HIERCON_POLL_SECS=0 "$TAG" serve >/dev/null
[ "$("$DOCKER" inspect -f '{{.HostConfig.NetworkMode}}' "$NAME")" = host ] || fail "the container is not on the host network"
health=
for _ in $(seq 90); do
    health=$("$DOCKER" inspect -f '{{.State.Health.Status}}' "$NAME")
    [ "$health" = healthy ] && break
    [ "$("$DOCKER" inspect -f '{{.State.Running}}' "$NAME")" = true ] || { "$DOCKER" logs "$NAME"; fail "the server exited"; }
    sleep 1
done
[ "$health" = healthy ] || { "$DOCKER" logs "$NAME"; fail "the image's HEALTHCHECK never passed ($health)"; }
echo "   HEALTHCHECK: $health; listening on $URL"
ss -ltn 2>/dev/null | grep -q "127.0.0.1:$PORT " || fail "the server does not listen on 127.0.0.1:$PORT"
READY=$(curl -fsS "$URL/readyz")
echo "   readyz: $READY"
FIRST=$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["generation"])' "$READY")

search() {  # search with the Google drawing of the athletic shoe: itself first, titled
    curl -fsS -X POST -H 'Content-Type: image/png' --data-binary @data/emoji/images/1f45f-google.png "$URL/v1/search?k=3"
}
python3 - "$(search)" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
top = r["hits"][0]
assert (top["id"], top["title"]) == ("google:1F45F", "athletic shoe"), top
print(f"   search: first hit {top['id']} ({top['title']}, score {top['score']:.3f}) from {r['generation']}")
PY

say "the re-index job, once, in the image"
"$DOCKER" run --rm --network host "${MOUNTS[@]}" "${ENVS[@]}" -e REINDEX_ONCE=1 \
    -e HIERCON_MANIFEST=/srv/data/catalogue/manifest.jsonl -e HIERCON_SERVER="$URL" -e HIERCON_INDEX_ARGS="--keep 2" \
    -e RUST_LOG=warn --entrypoint /usr/local/bin/hiercon-reindex "$TAG" 2>&1 | sed 's/^/   /'
NOW=$(curl -fsS "$URL/readyz" | python3 -c 'import json, sys; print(json.load(sys.stdin)["generation"])')
[ "$NOW" != "$FIRST" ] || fail "the server still serves $FIRST after the re-index job's reload call"
echo "   the server switched $FIRST -> $NOW"
RELOAD=$(curl -fsS -X POST -H "Authorization: Bearer $KEY" "$URL/v1/admin/reload")
echo "   reload: $RELOAD"
case $RELOAD in *"\"current\":\"$NOW\""*) ;; *) fail "unexpected reload answer";; esac
STATUS=$(curl -s -o /dev/null -w '%{http_code}' -X POST "$URL/v1/admin/reload")
[ "$STATUS" = 401 ] || fail "a reload without the key answered $STATUS"
python3 - "$(search)" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
assert r["hits"][0]["id"] == "google:1F45F", r["hits"][0]
print(f"   search after the reload: first hit {r['hits'][0]['id']} from {r['generation']}")
PY
STATUS=$(curl -s -o /dev/null -w '%{http_code}' "$URL/v1/images/google:1F45F")
[ "$STATUS" = 200 ] || fail "the image of google:1F45F answered $STATUS inside the re-indexed generation"
check_isolation
say "docker-test passed"

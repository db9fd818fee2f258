#!/usr/bin/env bash
# Replays docker/Dockerfile's steps as plain commands on this machine (no Docker engine here):
# the build stage, the ORT-from-wheel stage, then the runtime stage's layout and commands — the
# image's environment, `hiercon runtime`, the re-index job (docker/reindex.sh, once) and
# `hiercon serve` answering the health check and an admin reload on a loopback port.
# Usage: docker/check-steps.sh [catalogue manifest]   (default data/emoji/manifest.jsonl)
set -euo pipefail
cd "$(dirname "$0")/.."
ORT_VERSION=1.31.1
MANIFEST=${1:-data/emoji/manifest.jsonl}
WORK=$(mktemp -d)
trap 'kill "${SERVER_PID:-}" 2>/dev/null || true; rm -rf "$WORK"' EXIT

echo "== build stage"
cargo build --release --locked --bin hiercon

echo "== ort stage"
mkdir -p .cache/wheels
python3 -m pip download --quiet --no-deps --only-binary=:all: --dest .cache/wheels onnxruntime==$ORT_VERSION
python3 -m zipfile -e .cache/wheels/onnxruntime-$ORT_VERSION-*.whl "$WORK/wheel"
mkdir -p "$WORK/out"
cp "$WORK/wheel/onnxruntime/capi/libonnxruntime.so.$ORT_VERSION" \
   "$WORK/wheel/onnxruntime/capi/libonnxruntime_providers_shared.so" "$WORK/out/"

echo "== runtime stage (layout under $WORK/root)"
ROOT=$WORK/root
mkdir -p "$ROOT/opt/hiercon/ort" "$ROOT/usr/local/bin" "$ROOT/srv/index"
cp "$WORK/out/"* "$ROOT/opt/hiercon/ort/"
cp target/release/hiercon "$ROOT/usr/local/bin/hiercon"
cp docker/reindex.sh "$ROOT/usr/local/bin/hiercon-reindex"
export ORT_DYLIB_PATH=$ROOT/opt/hiercon/ort/libonnxruntime.so.$ORT_VERSION
export HIERCON_HOST=127.0.0.1 HIERCON_PORT=0 HIERCON_INDEX=$ROOT/srv/index/catalogue RUST_LOG=warn
echo "-- shared libraries the ORT library needs (all must resolve on the runtime base):"
ldd "$ORT_DYLIB_PATH" | sed 's/^/   /'
! ldd "$ORT_DYLIB_PATH" | grep -q "not found"
"$ROOT/usr/local/bin/hiercon" runtime

# The test encoder, as no trained model exists yet; its near-duplicate vectors of 64-px emoji leave
# an item or two unreachable in HNSW, hence --max-self-misses.
echo "-- the re-index job, once (test encoder)"
HIERCON_BIN=$ROOT/usr/local/bin/hiercon HIERCON_MANIFEST=$MANIFEST HIERCON_INDEX_ARGS="--test-encoder 64 --max-self-misses 10" \
    REINDEX_ONCE=1 "$ROOT/usr/local/bin/hiercon-reindex"

echo "-- the server"
export HIERCON_API_KEY=check-steps-key
"$ROOT/usr/local/bin/hiercon" serve --test-encoder 64 > "$WORK/serve.out" &
SERVER_PID=$!
for _ in $(seq 100); do grep -q "listening on" "$WORK/serve.out" 2>/dev/null && break; sleep 0.1; done
URL=$(sed -n 's/^listening on //p' "$WORK/serve.out")
echo "   $URL"
curl -fsS "$URL/healthz" >/dev/null && echo "   HEALTHCHECK ok"
curl -fsS "$URL/readyz"; echo
curl -fsS -X POST -H "Authorization: Bearer $HIERCON_API_KEY" "$URL/v1/admin/reload"; echo
FIRST=$(sed -n '1s/.*"image":"\([^"]*\)".*/\1/p' "$MANIFEST")
curl -fsS -X POST -H "Content-Type: image/png" --data-binary "@$(dirname "$MANIFEST")/$FIRST" "$URL/v1/search?k=3" | head -c 300; echo
kill -TERM "$SERVER_PID"; wait "$SERVER_PID"; SERVER_PID=
echo "== all steps ran"

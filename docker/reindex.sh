#!/bin/sh
# The nightly re-index job of docker/compose.yml: run `hiercon index`, then ask the server to load
# the new generation; once at start (so a fresh volume gets its first index), then every day at
# REINDEX_AT (UTC, HH:MM). The server also polls CURRENT, so a failed reload call loses nothing.
#   HIERCON_MANIFEST  catalogue manifest           (default /srv/data/catalogue/manifest.jsonl)
#   HIERCON_MODEL     exported model X.onnx         (empty: pass it in HIERCON_INDEX_ARGS instead)
#   HIERCON_INDEX     index directory                (default /srv/index/catalogue)
#   HIERCON_INDEX_ARGS more `hiercon index` flags    (e.g. "--keep 3 --min-recall 0.98")
#   HIERCON_SERVER    server base URL                (default http://server:8080)
#   HIERCON_API_KEY   the server's admin key         (empty: skip the reload call)
#   REINDEX_AT        daily time, UTC                (default 03:15)
#   REINDEX_ONCE      1: run once and exit with hiercon's exit code
set -u
MANIFEST=${HIERCON_MANIFEST:-/srv/data/catalogue/manifest.jsonl}
INDEX=${HIERCON_INDEX:-/srv/index/catalogue}
SERVER=${HIERCON_SERVER:-http://server:8080}
AT=${REINDEX_AT:-03:15}
HIERCON=${HIERCON_BIN:-hiercon}

run_once() {
    # shellcheck disable=SC2086  # HIERCON_INDEX_ARGS is a list of flags
    "$HIERCON" index --manifest "$MANIFEST" --out "$INDEX" ${HIERCON_MODEL:+--model "$HIERCON_MODEL"} ${HIERCON_INDEX_ARGS:-}
    code=$?
    echo "reindex: hiercon index exited $code (0 live, 2 bad input, 3 verification failed, 4 locked)"
    if [ "$code" -eq 0 ] && [ -n "${HIERCON_API_KEY:-}" ]; then
        curl -fsS -X POST -H "Authorization: Bearer $HIERCON_API_KEY" "$SERVER/v1/admin/reload" \
            || echo "reindex: reload call failed; the server's poll will pick the generation up"
        echo
    fi
    return "$code"
}

if [ "${REINDEX_ONCE:-0}" = 1 ]; then
    run_once
    exit $?
fi
while true; do
    run_once || true
    now=$(date -u +%s)
    next=$(date -u -d "today $AT" +%s)
    [ "$next" -gt "$now" ] || next=$(date -u -d "tomorrow $AT" +%s)
    echo "reindex: next run at $(date -u -d "@$next" '+%Y-%m-%d %H:%M') UTC"
    sleep $((next - now))
done

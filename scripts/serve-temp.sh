# Sourced by scripts/fuzz and scripts/bench: start the debug server on the embedded
# default in a temporary folder on a free port, rate limit off. Sets TARGET (cargo's
# target folder, honouring CARGO_TARGET_DIR), PORT, WORK and SERVER (pid) and stops the
# server on exit.
TARGET=$(cd "${CARGO_TARGET_DIR:-target}" 2>/dev/null && pwd || echo "$PWD/target")
cargo build --quiet --locked --bin catbird-server # a no-op when it is up to date
WORK=$(mktemp -d)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
(cd "$WORK" && PORT=$PORT RATE_LIMIT_PER_MINUTE=0 RUST_LOG=warn exec "$TARGET/debug/catbird-server" >"$WORK/server.log" 2>&1) &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 1 50); do curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.2; done
if ! curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null; then
    echo "the server did not become healthy within 10 s; its log:" >&2
    cat "$WORK/server.log" >&2
    exit 1
fi

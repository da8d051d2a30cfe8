#!/usr/bin/env bash
# Make sure the official AsyncAPI parser (@asyncapi/parser, pinned in tools/asyncapi/package-lock.json)
# is installed in tools/asyncapi/node_modules, for tests/test_asyncapi_spec.py, which validates
# docs/asyncapi.yaml with it (tools/asyncapi/validate.mjs). Installs it with `npm ci` from the npm
# registry when it is missing or the lock changed. Never fails: without Node.js, npm or the registry
# the validation tests are skipped, and say why (the reason is kept in tools/asyncapi/.unavailable).
set -uo pipefail

dir="$(cd "$(dirname "$0")/.." && pwd)/tools/asyncapi"
stamp="$dir/node_modules/.installed"
reason_file="$dir/.unavailable"

have() { command -v "$1" >/dev/null 2>&1; }

unavailable() {
    printf '%s\n' "$1" >"$reason_file"
    printf 'AsyncAPI validation of docs/asyncapi.yaml will be skipped: %s\n' "$1" >&2
    exit 0
}

if [ -f "$stamp" ] && [ "$stamp" -nt "$dir/package-lock.json" ] && [ "$stamp" -nt "$dir/package.json" ]; then
    rm -f "$reason_file"
    exit 0
fi

have node || unavailable "Node.js is not installed (needs Node.js 18 or newer and npm; Debian/Ubuntu: sudo apt-get install nodejs npm)"
major="$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)"
[ "$major" -ge 18 ] 2>/dev/null || unavailable "Node.js $(node --version 2>/dev/null) is too old (needs 18 or newer)"
have npm || unavailable "npm is not installed (Debian/Ubuntu: sudo apt-get install npm)"

echo "Installing the AsyncAPI parser from the npm registry (npm ci in tools/asyncapi)..."
# --ignore-scripts: no package's install script runs (one of the parser's dependencies would
# send install analytics); the parser needs none.
if log="$(cd "$dir" && npm ci --ignore-scripts --no-audit --no-fund --prefer-offline \
        --fetch-retries=1 --fetch-timeout=30000 2>&1)"; then
    touch "$stamp"
    rm -f "$reason_file"
    exit 0
fi
printf '%s\n' "$log" | tail -n 5 >&2
unavailable "npm ci in tools/asyncapi failed (is the npm registry $(npm config get registry 2>/dev/null) reachable?)"

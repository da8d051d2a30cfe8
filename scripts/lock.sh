#!/usr/bin/env bash
# Writes constraints.txt: every third-party package the distributions and the test tools need,
# pinned to the versions resolved today, so that `make` installs the same set on every machine
# (a new paho-mqtt or psutil release cannot change a fresh install behind our back). The
# pyproject.toml files keep open ranges for people who install a single part.
#   make lock     (after changing a dependency in a pyproject.toml or requirements-dev.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${BIN:-.venv/bin}
dists=${DISTS:?set DISTS to the distribution folders, as the Makefile does}
"$bin/python" -m pip install -q pip-tools
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for d in $dists; do echo "-e file:$d"; done > "$tmp/lock.in"
echo "-r $PWD/requirements-dev.txt" >> "$tmp/lock.in"
cp "$tmp/lock.in" ./.lock.in
trap 'rm -rf "$tmp" ./.lock.in' EXIT
"$bin/pip-compile" -q --no-header --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links \
    -o "$tmp/out.txt" .lock.in
{
    echo "# Pinned versions of every third-party package the project installs (make lock writes this"
    echo "# file with scripts/lock.sh; make installs with it as pip constraints). Do not edit by hand."
    grep -v -e '^-e ' -e '^    #' -e '^    ' "$tmp/out.txt" | sed '/^$/d'
} > constraints.txt
echo "constraints.txt: $(grep -c '==' constraints.txt) packages pinned"

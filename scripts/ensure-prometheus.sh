#!/usr/bin/env bash
# Make sure Prometheus and promtool are installed for the exposition's tests (a real Prometheus
# scrapes the dashboard's /metrics; promtool checks docs/prometheus/alerts.yml); install Debian's
# package when we can, otherwise say how. Never fails: without them those tests are skipped, and
# say why. The package's own service is not wanted (each test starts its own Prometheus), so its
# recommended node exporter is left out, and a service the package starts is stopped.
set -uo pipefail

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/bin/$1" ]; }

if have prometheus && have promtool; then
    exit 0
fi

sudo_cmd=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo_cmd="sudo"; else sudo_cmd="none"; fi
fi

if [ "$sudo_cmd" != "none" ] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing Prometheus (and promtool) from the system's packages (apt-get)..."
    if $sudo_cmd apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends prometheus \
            >/dev/null; then
        # where systemd runs, the package starts a Prometheus of its own on port 9090: not wanted here
        if [ -d /run/systemd/system ]; then $sudo_cmd systemctl disable --now prometheus >/dev/null 2>&1 || true; fi
        exit 0
    fi
fi

cat >&2 <<'MSG'
Prometheus is not installed, so the tests that scrape the dashboard with a real Prometheus and
check the alert rules with promtool will be skipped. To run them:
  Debian/Ubuntu:  sudo apt-get install --no-install-recommends prometheus
  elsewhere:      put the prometheus and promtool binaries of a release on PATH
MSG
exit 0

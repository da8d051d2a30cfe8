#!/usr/bin/env bash
# Make sure Chromium and its WebDriver are installed for the dashboard's browser tests;
# install them from the system's packages when we can, otherwise say how. (A test tool's
# own browser download does not work everywhere; Debian's packages do.) Never fails: without
# Chromium the browser tests are skipped, and say why.
set -uo pipefail

have() { command -v "$1" >/dev/null 2>&1; }

if { have chromium || have chromium-browser; } && have chromedriver; then
    exit 0
fi

sudo_cmd=""
if [ "$(id -u)" -ne 0 ]; then
    if have sudo && sudo -n true 2>/dev/null; then sudo_cmd="sudo"; else sudo_cmd="none"; fi
fi

if [ "$sudo_cmd" != "none" ] && have apt-get; then
    echo "Installing Chromium and chromium-driver from the system's packages (apt-get)..."
    $sudo_cmd apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq chromium chromium-driver >/dev/null \
        && exit 0
fi

cat >&2 <<'MSG'
Chromium is not installed, so the dashboard's browser tests will be skipped. To run them:
  Debian/Ubuntu:  sudo apt-get install chromium chromium-driver
  Fedora/RHEL:    sudo dnf install chromium chromedriver
MSG
exit 0

#!/usr/bin/env bash
# Make sure Mosquitto (broker and clients) is installed; install it from the system's
# packages when we can, otherwise say how.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/local/sbin/$1" ]; }

if have mosquitto && have mosquitto_rr; then
    exit 0
fi

sudo_cmd=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo_cmd="sudo"
    else
        sudo_cmd="none"
    fi
fi

if [ "$sudo_cmd" != "none" ]; then
    if command -v apt-get >/dev/null 2>&1; then
        echo "Installing Mosquitto from the system's packages (apt-get)..."
        $sudo_cmd apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
        exit 0
    elif command -v dnf >/dev/null 2>&1; then
        echo "Installing Mosquitto from the system's packages (dnf)..."
        $sudo_cmd dnf install -y -q mosquitto
        exit 0
    fi
fi
if command -v brew >/dev/null 2>&1; then
    echo "Installing Mosquitto with Homebrew..."
    brew install mosquitto
    exit 0
fi

cat >&2 <<'MSG'
Mosquitto is needed but not installed, and it cannot be installed from here.
Install it, then run the command again:
  Debian/Ubuntu:  sudo apt-get install mosquitto mosquitto-clients
  Fedora/RHEL:    sudo dnf install mosquitto
  macOS:          brew install mosquitto
MSG
exit 1

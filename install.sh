#!/usr/bin/env bash
# Creates .venv beside this file and installs mxisd into it (with "test" extras when asked: ./install.sh test).
set -euo pipefail
cd "$(dirname "$0")"
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if [ ! -x .venv/bin/python ]; then
    if ! python3 -m venv .venv 2>/dev/null; then
        rm -rf .venv
        echo "python3-venv is missing: installing it from Debian's packages" >&2
        as_root apt-get update -qq
        as_root apt-get install -y -qq python3-venv python3-pip
        python3 -m venv .venv
    fi
    .venv/bin/python -m pip install -q --upgrade pip
fi
extras=""
[ "${1:-}" = test ] && extras="[test]"
.venv/bin/python -m pip install -q -e ".${extras}"

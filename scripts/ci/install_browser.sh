#!/usr/bin/env bash
# Installs what tests/test_browser.py needs: Debian's chromium (Playwright's own browser
# download is not used; tests launch /usr/bin/chromium) and the playwright Python package.
# Idempotent: skips each step that is already done.
set -euo pipefail
PYTHON="${PYTHON:-.venv/bin/python}"

if [ ! -x /usr/bin/chromium ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update
    # Without recommends (udev, upower, mesa, ...), but with a font so that pages render text.
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends \
        chromium fonts-liberation
fi

if ! "$PYTHON" -c "import playwright" 2>/dev/null; then
    "$PYTHON" -m pip --disable-pip-version-check -q install "playwright>=1.40"
fi

#!/usr/bin/env bash
# Installs what tests/test_dicom_node.py needs: Debian's Orthanc (a real PACS; the test starts
# its own instance with its own config, never the system service) and dcmtk (dsrdump,
# storescu). Idempotent: skips what is already there.
set -euo pipefail

if [ ! -x /usr/sbin/Orthanc ] || ! command -v dsrdump >/dev/null; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update
    # policy-rc.d exit 101: the package's post-install must not start the system service
    # (it would hold ports 4242/8042 and is not what the tests talk to).
    NOSTART=/usr/sbin/policy-rc.d
    CREATED=""
    if [ ! -e "$NOSTART" ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$NOSTART" >/dev/null
        $SUDO chmod +x "$NOSTART"
        CREATED=1
    fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends \
        orthanc dcmtk || { [ -n "$CREATED" ] && $SUDO rm -f "$NOSTART"; exit 1; }
    if [ -n "$CREATED" ]; then $SUDO rm -f "$NOSTART"; fi
fi

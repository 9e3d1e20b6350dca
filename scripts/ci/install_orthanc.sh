#!/usr/bin/env bash
# Installs what tests/test_dicom_node.py and tests/test_dicom_results.py need: Debian's Orthanc
# (a real PACS; the tests start their own instances with their own config, never the system
# service) with its DICOMweb plugin (orthanc-dicomweb: STOW-RS, QIDO-RS, WADO-RS), dcmtk
# (dsrdump, dcmpschk, storescu) and dicom3tools (dciodvfy, the IOD validator).
# Idempotent: skips what is already there.
set -euo pipefail

have_all() {
    [ -x /usr/sbin/Orthanc ] && [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] &&
        command -v dsrdump >/dev/null && command -v dcmpschk >/dev/null &&
        command -v dciodvfy >/dev/null
}

if ! have_all; then
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
        orthanc orthanc-dicomweb dcmtk dicom3tools ||
        { [ -n "$CREATED" ] && $SUDO rm -f "$NOSTART"; exit 1; }
    if [ -n "$CREATED" ]; then $SUDO rm -f "$NOSTART"; fi
fi

#!/bin/bash
# Prepare this host for vTPM guests: Debian packages, /dev/kvm permissions,
# virtlogd + libvirtd (without systemd when there is none), and wait until
# qemu:///system answers. Idempotent: a second run changes nothing.
set -euo pipefail
TAG=setup-host
# shellcheck source=tools/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"


[ "$(id -u)" = 0 ] || die "must run as root (installs packages, starts libvirtd)"

# tpm2-tools: not for this host: tools/build-guest.sh copies it, with the libraries it
# links, into the test guest's initramfs (the guest's TPM client).
# ovmf: UEFI firmware with Secure Boot (and its descriptors, which libvirt picks from);
# mtools, fdisk (sfdisk), sbsigntool (sbattach): tools/build-guest.sh's UEFI disks.
PACKAGES=(libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients
          qemu-system-x86 swtpm swtpm-tools libvirt-dev pkg-config
          busybox-static cpio gzip python3-venv python3-dev gcc tpm2-tools
          ovmf mtools fdisk sbsigntool openssl)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing: ${missing[*]}"
    apt-get update -qq || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null || die "apt-get install failed: ${missing[*]}"
else
    say "packages already installed"
fi

# A root:root 0600 /dev/kvm makes libvirt re-probe QEMU on every call
# (~56 s per domain start); guests run under TCG anyway.
if [ -e /dev/kvm ]; then
    if [ "$(stat -c %G:%a /dev/kvm)" != "kvm:660" ] && getent group kvm >/dev/null; then
        say "fixing /dev/kvm permissions (kvm:0660)"
        chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
    fi
fi

if [ -d /run/systemd/system ]; then
    systemctl start virtlogd libvirtd
else
    mkdir -p /run/libvirt
    # The system daemons are the ones named by their pid files: the test hosts run their
    # own virtlogd and libvirtd (tools/test-hosts.sh), which pgrep would find as well.
    running() {
        local pid
        pid=$(cat "/run/$1.pid" 2>/dev/null) && [ -n "$pid" ] \
            && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]
    }
    if ! running virtlogd; then
        say "starting virtlogd"
        virtlogd -d
    fi
    if ! running libvirtd; then
        say "starting libvirtd"
        libvirtd -d
    fi
fi

say "waiting for qemu:///system (the first connection probes QEMU, ~10 s)"
for _ in $(seq 1 120); do
    if virsh -q -c qemu:///system uri >/dev/null 2>&1; then
        say "libvirt answers at qemu:///system"
        exit 0
    fi
    sleep 0.5
done
die "libvirtd did not answer at qemu:///system within 60 s (see /var/log/libvirt/libvirtd.log)"

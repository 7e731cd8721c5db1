#!/bin/bash
# Build the tiny test guest used by the functional tests and the demo:
#   $VTPM_GUEST_DIR/vmlinuz     Debian's cloud kernel (TPM TIS + CRB drivers built in)
#   $VTPM_GUEST_DIR/initrd.img  gzip'ed newc cpio: busybox-static + tools/guest/init +
#                               tpm2-tools (Debian's, with the libraries it loads)
#   $VTPM_GUEST_DIR/uefi.img    raw GPT disk whose EFI System Partition boots the same
#                               kernel and initrd under UEFI Secure Boot: Debian's
#                               Microsoft-signed shim, Debian-signed GRUB, Debian-signed
#                               kernel (boot it with OVMF's Microsoft keys enrolled)
#   $VTPM_GUEST_DIR/uefi-unsigned.img  the same with the kernel's signature removed: Secure
#                               Boot must refuse it ("bad shim signature")
# (VTPM_GUEST_DIR defaults to /var/cache/vtpm-driver/guest.)
#
# The kernel package is fetched with `apt-get download` and unpacked with `dpkg -x`: nothing
# is installed on the host.  Idempotent: a *.stamp file next to each output records what it
# was built from, and an up-to-date output is left alone (a re-run takes well under 2 s).
# Boot with: -kernel vmlinuz -initrd initrd.img -append 'console=ttyS0 [vtpm_test=stay]'.
set -euo pipefail
TAG=build-guest
# shellcheck source=tools/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"


GUEST_DIR=${VTPM_GUEST_DIR:-/var/cache/vtpm-driver/guest}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
INIT_SRC=$HERE/guest/init
BUSYBOX=/bin/busybox
# The guest's TPM client: Debian's tpm2-tools (one multi-call binary), the libraries it
# links and the device TCTI libtss2 loads at run time (dlopen, so ldd does not list it).
TPM2=/usr/bin/tpm2
TPM2_DLOPEN=(/usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0)
META_PKG=linux-image-cloud-amd64
# The signed boot chain of uefi.img (fetched and unpacked like the kernel, never installed:
# their maintainer scripts would run grub-install on this host).
EFI_PKGS=(shim-signed grub-efi-amd64-signed)
SHIM_EFI=usr/lib/shim/shimx64.efi.signed
GRUB_EFI=usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed
# Command line of the UEFI guest (GRUB's menu entry; a disk carries its own).
UEFI_CMDLINE="console=ttyS0 vtpm_test=stay"
# Loaded by /init in vtpm_test=stay mode so an ACPI power-button press can be seen.
MODULES=(drivers/input/evdev.ko drivers/acpi/button.ko)
# The guest finds its TPM through these; they must be built in (=y), not modules.
KCONFIG_NEEDED=(CONFIG_TCG_TPM CONFIG_TCG_TIS CONFIG_TCG_CRB CONFIG_BLK_DEV_INITRD
                CONFIG_RD_GZIP CONFIG_DEVTMPFS CONFIG_SERIAL_8250_CONSOLE)

for cmd in apt-get apt-cache dpkg dpkg-deb cpio gzip sha256sum flock mformat mmd mcopy sfdisk \
           sbattach; do
    command -v "$cmd" >/dev/null || die "'$cmd' not found (run tools/setup-host.sh)"
done
[ -r "$INIT_SRC" ] || die "guest init script missing: $INIT_SRC"
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "install ok installed" \
    || die "busybox-static is not installed (apt-get install busybox-static, or run" \
           "tools/setup-host.sh): the initramfs needs a statically linked busybox"
[ -x "$BUSYBOX" ] || die "$BUSYBOX missing although busybox-static is installed"
[ -x "$TPM2" ] && [ -e "${TPM2_DLOPEN[0]}" ] || die "tpm2-tools is not installed (apt-get" \
    "install tpm2-tools, or run tools/setup-host.sh): the guest's TPM client comes from it"

mkdir -p "$GUEST_DIR" 2>/dev/null || die "cannot create $GUEST_DIR (set VTPM_GUEST_DIR?)"
[ -w "$GUEST_DIR" ] || die "$GUEST_DIR is not writable (run as root or set VTPM_GUEST_DIR)"

# One build at a time per directory (several test sessions may ask at once).
exec 9>"$GUEST_DIR/.lock"
flock -w 300 9 || die "another build holds $GUEST_DIR/.lock for more than 300 s"
# Leftovers of an interrupted build (we hold the lock, so nobody else is using them).
rm -rf "$GUEST_DIR"/.build.* "$GUEST_DIR"/*.new "$GUEST_DIR"/modules/*.new

# Scratch space next to the outputs (same file system, so the final mv is atomic).
WORK=
cleanup() { if [ -n "$WORK" ]; then rm -rf "$WORK"; fi; }
trap cleanup EXIT
make_workdir() {
    [ -n "$WORK" ] || WORK=$(mktemp -d "$GUEST_DIR/.build.XXXXXX")
}

# The real, versioned kernel package behind the meta package, as "name=version": the meta
# package pins it exactly ("Depends: linux-image-6.1.0-NN-cloud-amd64 (= V)").  One
# apt-cache call (~1 s here: apt's binary cache is disabled in this image).
resolve_kernel() {
    apt-cache show --no-all-versions "$META_PKG" 2>/dev/null | awk '
        $1 == "Depends:" {
            for (i = 2; i <= NF; i++)
                if ($i ~ /^linux-image-.*-cloud-amd64$/ && $(i + 1) == "(=") {
                    v = $(i + 2); sub(/[),].*/, "", v); print $i "=" v; exit
                }
        }' | grep .
}

build_kernel() {
    local want=$1 pkg=${1%%=*} w deb cfg opt missing=() m
    make_workdir
    w=$WORK
    say "downloading $want (apt-get download, ~27 MB)"
    local sandbox=()
    # As root, apt wants to download as _apt, which cannot write into our 0700 work dir.
    [ "$(id -u)" = 0 ] && sandbox=(-o APT::Sandbox::User=root)
    (cd "$w" && apt-get -q "${sandbox[@]}" download "$want" >"$w/apt.log" 2>&1) \
        || die "apt-get download $want failed:$(printf '\n'; tail -n 5 "$w/apt.log")"
    deb=$(ls "$w"/"$pkg"_*.deb 2>/dev/null | head -n 1)
    [ -n "$deb" ] || die "apt-get download produced no .deb for $pkg in $w"

    say "unpacking $(basename "$deb") (dpkg -x, not installed)"
    dpkg -x "$deb" "$w/root" || die "dpkg -x $deb failed"
    cfg=$(ls "$w"/root/boot/config-* 2>/dev/null | head -n 1)
    [ -n "$cfg" ] || die "$pkg has no /boot/config-*: cannot check its TPM drivers"
    for opt in "${KCONFIG_NEEDED[@]}"; do
        grep -qx "$opt=y" "$cfg" || missing+=("$opt")
    done
    [ ${#missing[@]} -eq 0 ] \
        || die "$pkg does not build in: ${missing[*]} (the guest would see no TPM/console)"
    say "kernel config has TPM TIS and CRB drivers built in"

    local kver
    kver=${cfg##*/config-}
    [ -f "$w/root/boot/vmlinuz-$kver" ] || die "$pkg has no /boot/vmlinuz-$kver"
    mkdir -p "$GUEST_DIR/modules"
    for m in "${MODULES[@]}"; do
        [ -f "$w/root/lib/modules/$kver/kernel/$m" ] \
            || die "$pkg lacks module $m (needed for the power button in vtpm_test=stay)"
        cp "$w/root/lib/modules/$kver/kernel/$m" "$GUEST_DIR/modules/${m##*/}.new"
        mv -f "$GUEST_DIR/modules/${m##*/}.new" "$GUEST_DIR/modules/${m##*/}"
    done
    cp "$w/root/boot/vmlinuz-$kver" "$GUEST_DIR/vmlinuz.new"
    mv -f "$GUEST_DIR/vmlinuz.new" "$GUEST_DIR/vmlinuz"
    echo "$want" >"$GUEST_DIR/vmlinuz.stamp"
    rm -rf "$w/root" "$deb"
    say "wrote $GUEST_DIR/vmlinuz ($kver)"
}

# --- kernel -----------------------------------------------------------------------------
have_kernel=
if [ -s "$GUEST_DIR/vmlinuz" ] && [ -s "$GUEST_DIR/vmlinuz.stamp" ]; then
    have_kernel=$(cat "$GUEST_DIR/vmlinuz.stamp")
    for m in "${MODULES[@]}"; do
        [ -s "$GUEST_DIR/modules/${m##*/}" ] || have_kernel=
    done
fi
want_kernel=
# Ask apt only when its package lists changed since the kernel was fetched: keeps a
# re-run fast and lets it work offline.
if [ -z "$have_kernel" ] \
        || [ -n "$(find /var/lib/apt/lists -maxdepth 1 -newer "$GUEST_DIR/vmlinuz.stamp" \
                   -print -quit 2>/dev/null)" ]; then
    want_kernel=$(resolve_kernel || true)
fi
if [ -z "$want_kernel" ] && [ -z "$have_kernel" ]; then
    say "apt does not know $META_PKG yet: running apt-get update"
    apt-get update -qq >/dev/null 2>&1 || die "apt-get update failed (no network/apt access?)"
    want_kernel=$(resolve_kernel) \
        || die "cannot resolve $META_PKG to a linux-image-*-cloud-amd64 package (apt sources?)"
fi
if [ -z "$want_kernel" ]; then
    say "kernel up to date ($have_kernel)"
elif [ "$want_kernel" = "$have_kernel" ]; then
    touch "$GUEST_DIR/vmlinuz.stamp"   # checked against the current apt lists
    say "kernel up to date ($have_kernel)"
else
    [ -n "$have_kernel" ] && say "kernel changed: $have_kernel -> $want_kernel"
    build_kernel "$want_kernel"
fi

# --- initrd -----------------------------------------------------------------------------
# Rebuilt when /init, busybox or the modules change (content hashes, not mtimes, so a
# fresh checkout does not force a rebuild).
# The files tpm2 needs in the guest: itself, the libraries ldd resolves (the dynamic
# loader among them), the dlopen'ed TCTI. One path per line.
tpm2_files() {
    echo "$TPM2"
    ldd "$TPM2" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'
    printf '%s\n' "${TPM2_DLOPEN[@]}"
}
initrd_inputs() {
    sha256sum "$INIT_SRC" "$BUSYBOX" "$GUEST_DIR"/modules/*.ko $(tpm2_files) | awk '{print $1}'
    echo "format=2"
}
# up_to_date STAMP DIGEST OUTPUT...: every OUTPUT is there and STAMP records DIGEST.
up_to_date() {
    local stamp=$1 digest=$2 out
    shift 2
    for out in "$@"; do
        [ -s "$out" ] || return 1
    done
    [ "$(cat "$stamp" 2>/dev/null)" = "$digest" ]
}
want_initrd=$(initrd_inputs | sha256sum | awk '{print $1}')
if up_to_date "$GUEST_DIR/initrd.img.stamp" "$want_initrd" "$GUEST_DIR/initrd.img"; then
    say "initrd up to date"
else
    say "building initrd.img (busybox-static + tools/guest/init + tpm2-tools)"
    make_workdir
    root=$WORK/initrd
    mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,lib/modules}
    cp "$BUSYBOX" "$root/bin/busybox"
    ln -s busybox "$root/bin/sh"
    install -m 0755 "$INIT_SRC" "$root/init"
    cp "$GUEST_DIR"/modules/*.ko "$root/lib/modules/"
    # tpm2-tools at the paths it has here, so the loader and its search paths just work.
    tpm2_files | while read -r f; do
        mkdir -p "$root$(dirname "$f")"
        cp -L "$f" "$root$f"
    done
    # The kernel opens /dev/console before running /init; without the node (needs root to
    # create) /init still works: it reopens the console after mounting devtmpfs.
    if [ "$(id -u)" = 0 ]; then
        mknod -m 0600 "$root/dev/console" c 5 1
    fi
    # Fixed mtimes: the same inputs give the same bytes.
    find "$root" -exec touch -h -d @0 {} +
    (cd "$root" && find . -mindepth 1 | LC_ALL=C sort \
        | cpio -o -H newc -R 0:0 --reproducible --quiet) \
        | gzip -9n >"$GUEST_DIR/initrd.img.new" || die "cpio/gzip of the initramfs failed"
    mv -f "$GUEST_DIR/initrd.img.new" "$GUEST_DIR/initrd.img"
    echo "$want_initrd" >"$GUEST_DIR/initrd.img.stamp"
    say "wrote $GUEST_DIR/initrd.img ($(du -k "$GUEST_DIR/initrd.img" | cut -f1) KiB)"
fi

# --- UEFI Secure Boot disks -------------------------------------------------------------
# The exact versions apt would install now, as "name=version" lines.
resolve_efi() {
    local p v
    for p in "${EFI_PKGS[@]}"; do
        v=$(apt-cache show --no-all-versions "$p" 2>/dev/null | awk '$1 == "Version:" {print $2; exit}')
        [ -n "$v" ] || return 1
        echo "$p=$v"
    done
}

# fetch_efi "name=version"...: shimx64.efi and grubx64.efi into $GUEST_DIR/efi.
fetch_efi() {
    local want deb sandbox=()
    make_workdir
    [ "$(id -u)" = 0 ] && sandbox=(-o APT::Sandbox::User=root)
    mkdir -p "$WORK/efi-debs" "$WORK/efi-root" "$GUEST_DIR/efi"
    for want in "$@"; do
        say "downloading $want (apt-get download)"
        (cd "$WORK/efi-debs" && apt-get -q "${sandbox[@]}" download "$want" \
            >"$WORK/apt-efi.log" 2>&1) \
            || die "apt-get download $want failed:$(printf '\n'; tail -n 5 "$WORK/apt-efi.log")"
    done
    for deb in "$WORK"/efi-debs/*.deb; do
        dpkg -x "$deb" "$WORK/efi-root" || die "dpkg -x $deb failed"
    done
    [ -f "$WORK/efi-root/$SHIM_EFI" ] || die "shim-signed has no /$SHIM_EFI"
    [ -f "$WORK/efi-root/$GRUB_EFI" ] || die "grub-efi-amd64-signed has no /$GRUB_EFI"
    cp "$WORK/efi-root/$SHIM_EFI" "$GUEST_DIR/efi/shimx64.efi"
    cp "$WORK/efi-root/$GRUB_EFI" "$GUEST_DIR/efi/grubx64.efi"
    printf '%s\n' "$@" >"$GUEST_DIR/efi/stamp"
    rm -rf "$WORK/efi-debs" "$WORK/efi-root"
}

have_efi=$(cat "$GUEST_DIR/efi/stamp" 2>/dev/null || true)
[ -s "$GUEST_DIR/efi/shimx64.efi" ] && [ -s "$GUEST_DIR/efi/grubx64.efi" ] || have_efi=
want_efi=
if [ -z "$have_efi" ] \
        || [ -n "$(find /var/lib/apt/lists -maxdepth 1 -newer "$GUEST_DIR/efi/stamp" \
                   -print -quit 2>/dev/null)" ]; then
    want_efi=$(resolve_efi || true)
fi
[ -n "$want_efi" ] || [ -n "$have_efi" ] \
    || die "apt knows no ${EFI_PKGS[*]} (apt sources? run apt-get update)"
if [ -n "$want_efi" ] && [ "$want_efi" != "$have_efi" ]; then
    # shellcheck disable=SC2086 # one "name=version" per line
    fetch_efi $want_efi
else
    touch "$GUEST_DIR/efi/stamp"
    say "signed shim and GRUB up to date"
fi

# esp_disk OUT KERNEL: a raw GPT disk, one FAT EFI System Partition holding shim as the
# removable-media loader, GRUB beside it, its grub.cfg where Debian's signed GRUB looks
# (prefix /EFI/debian), KERNEL and initrd.img. mtools and sfdisk work on image files: no
# loop device, no mount. No fbx64.efi: shim would run it, make a boot entry and reset.
esp_disk() {
    local out=$1 kernel=$2 cfg esp bytes mb
    make_workdir
    cfg=$WORK/grub.cfg
    esp=$WORK/esp.img
    printf 'set timeout=0\nset default=0\nmenuentry vtpm-test {\n\tlinux /vmlinuz %s\n\tinitrd /initrd.img\n}\n' \
        "$UEFI_CMDLINE" >"$cfg"
    bytes=$(cat "$GUEST_DIR/efi/shimx64.efi" "$GUEST_DIR/efi/grubx64.efi" "$kernel" \
                "$GUEST_DIR/initrd.img" "$cfg" | wc -c)
    mb=$(( (bytes + 1048575) / 1048576 + 4 ))   # + room for FAT's own tables
    rm -f "$esp"
    truncate -s "${mb}M" "$esp"
    MTOOLS_SKIP_CHECK=1 mformat -i "$esp" -T $((mb * 2048)) -h 64 -s 32 -v ESP :: \
        || die "mformat of the EFI System Partition failed"
    MTOOLS_SKIP_CHECK=1 mmd -i "$esp" ::/EFI ::/EFI/BOOT ::/EFI/debian
    MTOOLS_SKIP_CHECK=1 mcopy -i "$esp" "$GUEST_DIR/efi/shimx64.efi" ::/EFI/BOOT/BOOTX64.EFI
    MTOOLS_SKIP_CHECK=1 mcopy -i "$esp" "$GUEST_DIR/efi/grubx64.efi" ::/EFI/BOOT/grubx64.efi
    MTOOLS_SKIP_CHECK=1 mcopy -i "$esp" "$cfg" ::/EFI/debian/grub.cfg
    MTOOLS_SKIP_CHECK=1 mcopy -i "$esp" "$kernel" ::/vmlinuz
    MTOOLS_SKIP_CHECK=1 mcopy -i "$esp" "$GUEST_DIR/initrd.img" ::/initrd.img
    rm -f "$out.new"
    truncate -s $((mb + 2))M "$out.new"   # 1 MiB before the ESP, 1 MiB for the backup GPT
    printf 'label: gpt\nunit: sectors\nstart=2048, size=%d, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="EFI System Partition"\n' \
        $((mb * 2048)) | sfdisk -q "$out.new" >/dev/null || die "sfdisk of $out failed"
    dd if="$esp" of="$out.new" bs=1M seek=1 conv=notrunc status=none || die "dd into $out failed"
    rm -f "$esp"
    mv -f "$out.new" "$out"
}

uefi_inputs() {
    sha256sum "$GUEST_DIR/efi/shimx64.efi" "$GUEST_DIR/efi/grubx64.efi" "$GUEST_DIR/vmlinuz" \
        "$GUEST_DIR/initrd.img" | awk '{print $1}'
    echo "cmdline=$UEFI_CMDLINE format=1"
}
want_uefi=$(uefi_inputs | sha256sum | awk '{print $1}')
if up_to_date "$GUEST_DIR/uefi.img.stamp" "$want_uefi" "$GUEST_DIR/uefi.img" \
        "$GUEST_DIR/uefi-unsigned.img"; then
    say "UEFI disks up to date"
else
    say "building uefi.img and uefi-unsigned.img (shim -> GRUB -> kernel, Secure Boot)"
    esp_disk "$GUEST_DIR/uefi.img" "$GUEST_DIR/vmlinuz"
    make_workdir
    cp "$GUEST_DIR/vmlinuz" "$WORK/vmlinuz-unsigned"
    sbattach --remove "$WORK/vmlinuz-unsigned" >/dev/null \
        || die "sbattach --remove could not strip the kernel's signature"
    esp_disk "$GUEST_DIR/uefi-unsigned.img" "$WORK/vmlinuz-unsigned"
    echo "$want_uefi" >"$GUEST_DIR/uefi.img.stamp"
    say "wrote $GUEST_DIR/uefi.img, $GUEST_DIR/uefi-unsigned.img ($(du -k "$GUEST_DIR/uefi.img" | cut -f1) KiB each)"
fi

say "guest ready: $GUEST_DIR/vmlinuz $GUEST_DIR/initrd.img (cmdline: console=ttyS0)," \
    "$GUEST_DIR/uefi.img (UEFI Secure Boot)"

#!/usr/bin/env bash
# Build a tiny Linux guest (kernel + busybox initramfs + SeaBIOS) from Debian packages, for
# driving iovirt's device models with real Linux drivers under QEMU TCG or the example VMM.
# Run with --help for usage. Idempotent: steps whose outputs exist and whose inputs did not
# change are skipped (stamps live in OUT/.stamps).
set -euo pipefail

readonly DEFAULT_KERNEL_PACKAGE=linux-image-cloud-amd64
readonly DEFAULT_MODULES="virtio_pci virtio_blk virtio_net ata_piix sd_mod sr_mod isofs"
SELF_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SELF_DIR/../.." && pwd)
readonly SELF_DIR REPO_DIR

usage() {
	cat <<EOF
Usage: tools/guest-image/build.sh [options]

Fetches a Debian kernel, busybox-static and seabios with apt-get download, and writes into OUT:
  vmlinux              uncompressed kernel ELF (boots with qemu -kernel via PVH)
  vmlinuz              the Debian bzImage as shipped
  initrd-NAME.gz       gzip'd newc cpio: busybox, modules (+deps, modules.dep), /init, /test.sh
  bios-256k.bin        SeaBIOS from the seabios package
  manifest.txt         KEY=VALUE lines: kernel release, packages, compression, initrds

The guest's /init mounts proc, sysfs and devtmpfs, modprobes the modules (absent hardware is
fine), prints "IOVIRT-GUEST-START", runs /test.sh, prints "IOVIRT-GUEST-END status=N" with the
script's exit status and powers off. Boot with: -append "console=ttyS0 quiet panic=-1" -no-reboot.

Options:
  --out DIR               output directory (required)
  --cache DIR             download/extract cache (default: \$IOVIRT_CACHE or <repo>/.cache)
  --script FILE           guest script, installed as /test.sh and run by /init with sh
                          (default: one that prints the kernel version)
  --name NAME             initrd name -> initrd-NAME.gz (default: script's basename without
                          extension, or "default" without --script)
  --kernel-package PKG    kernel package or metapackage (default: $DEFAULT_KERNEL_PACKAGE;
                          e.g. linux-image-6.12-cloud-amd64)
  --module MOD            extra module to include and load, before the others (repeatable;
                          dependencies follow; an IOMMU driver such as virtio_iommu must be
                          up before the drivers of the devices behind it probe)
  --modules "A B C"       replace the default module list ($DEFAULT_MODULES)
  -q, --quiet             only print the initrd path on stdout
  -h, --help              this text

The last line on stdout is the path of the initrd. One kernel per OUT: switching kernels
removes initrds built for another kernel from OUT.
Needs root for apt-get (missing tools: cpio kmod lz4 zstd xz-utils file are installed by apt).
EOF
}

log() { [[ $QUIET == 1 ]] || printf 'guest-image: %s\n' "$*" >&2; }
die() {
	printf 'guest-image: error: %s\n' "$*" >&2
	exit 1
}

CACHE=${IOVIRT_CACHE:-$REPO_DIR/.cache}
OUT=
SCRIPT=
NAME=
KERNEL_PACKAGE=$DEFAULT_KERNEL_PACKAGE
MODULES=$DEFAULT_MODULES
QUIET=0
while (($#)); do
	case $1 in
	--out) OUT=${2:?--out needs a value} && shift ;;
	--cache) CACHE=${2:?--cache needs a value} && shift ;;
	--script) SCRIPT=${2:?--script needs a value} && shift ;;
	--name) NAME=${2:?--name needs a value} && shift ;;
	--kernel-package) KERNEL_PACKAGE=${2:?--kernel-package needs a value} && shift ;;
	--module) EXTRA_MODULES="${EXTRA_MODULES:-} ${2:?--module needs a value}" && shift ;;
	--modules) MODULES=${2?--modules needs a value} && shift ;;
	-q | --quiet) QUIET=1 ;;
	-h | --help) usage && exit 0 ;;
	*) usage >&2 && die "unknown argument: $1" ;;
	esac
	shift
done
MODULES="${EXTRA_MODULES:-} $MODULES"
[[ -n $OUT ]] || {
	usage >&2
	die "--out DIR is required"
}
if [[ -n $SCRIPT ]]; then
	[[ -f $SCRIPT ]] || die "no such script: $SCRIPT"
	[[ -n $NAME ]] || NAME=$(basename "${SCRIPT%.*}")
fi
[[ -n $NAME ]] || NAME=default
[[ $NAME =~ ^[A-Za-z0-9._+-]+$ ]] || die "bad --name '$NAME' (use letters, digits, . _ + -)"

mkdir -p "$CACHE/guest-image" "$OUT/.stamps"
CACHE=$(cd "$CACHE" && pwd)
OUT=$(cd "$OUT" && pwd)
readonly GI="$CACHE/guest-image"

# One build at a time per cache (parallel test runs share downloads and extractions).
exec 9>"$GI/.lock"
flock 9

TMP=$(mktemp -d "$GI/tmp.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

# apt-cache rebuilds its package cache from the lists on every call when the system disables
# pkgcache.bin (Debian's Docker images do): keep one in our cache so repeated runs stay fast.
APT_OPTS=(-o "Dir::Cache::pkgcache=$GI/apt-pkgcache.bin" -o "Dir::Cache::srcpkgcache=$GI/apt-srcpkgcache.bin")

# --- host tools -------------------------------------------------------------------------------
APT_UPDATED=0
apt_update_once() {
	((APT_UPDATED)) && return 0
	log "apt-get update"
	apt-get update -qq >&2 || die "apt-get update failed"
	APT_UPDATED=1
}

ensure_tools() {
	local -A pkg_of=([cpio]=cpio [depmod]=kmod [modprobe]=kmod [lz4]=lz4 [zstd]=zstd [xz]=xz-utils
		[file]=file [dpkg-deb]=dpkg [flock]=util-linux [gzip]=gzip)
	local cmd missing=()
	for cmd in "${!pkg_of[@]}"; do
		command -v "$cmd" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null 2>&1 ||
			missing+=("${pkg_of[$cmd]}")
	done
	((${#missing[@]})) || return 0
	mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
	log "installing ${missing[*]}"
	if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2; then
		apt_update_once
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2 ||
			die "cannot install ${missing[*]}"
	fi
}
export PATH="$PATH:/usr/sbin:/sbin"
ensure_tools

# --- stamps: an output is up to date if it exists and its recorded input key matches -----------
fresh() { [[ -e $1 && -f $OUT/.stamps/$(basename "$1") && "$(<"$OUT/.stamps/$(basename "$1")")" == "$2" ]]; }
stamp() { printf '%s\n' "$2" >"$OUT/.stamps/$(basename "$1")"; }

# --- packages ---------------------------------------------------------------------------------
# candidate_version PKG -> Version of the candidate (updates the lists once if apt knows nothing).
candidate_version() {
	local v
	v=$(apt-cache "${APT_OPTS[@]}" policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}')
	if [[ -z $v || $v == "(none)" ]]; then
		apt_update_once
		v=$(apt-cache "${APT_OPTS[@]}" policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}')
	fi
	[[ -n $v && $v != "(none)" ]] || die "apt knows no installable package '$1'"
	printf '%s\n' "$v"
}

# fetch PKG -> path of the cached .deb for the candidate version (downloads when missing).
fetch() {
	local pkg=$1 ver deb
	ver=$(candidate_version "$pkg")
	mkdir -p "$GI/debs"
	deb=$(find "$GI/debs" -maxdepth 1 -name "${pkg}_${ver//:/%3a}_*.deb" -print -quit)
	if [[ -z $deb ]]; then
		log "downloading $pkg $ver"
		if ! (cd "$TMP" && apt-get "${APT_OPTS[@]}" -o APT::Sandbox::User=root -qq download "$pkg=$ver" >&2); then
			apt_update_once
			(cd "$TMP" && apt-get "${APT_OPTS[@]}" -o APT::Sandbox::User=root -qq download "$pkg=$ver" >&2) ||
				die "apt-get download $pkg=$ver failed"
		fi
		deb=$(find "$TMP" -maxdepth 1 -name "${pkg}_*.deb" -print -quit)
		[[ -n $deb ]] || die "apt-get download $pkg left no .deb"
		mv "$deb" "$GI/debs/"
		deb="$GI/debs/$(basename "$deb")"
	fi
	printf '%s\n' "$deb"
}

# extract DEB -> directory with the package's files (cached per .deb).
extract() {
	local deb=$1 dir
	dir="$GI/root/$(basename "$deb" .deb)"
	if [[ ! -e $dir/.extracted ]]; then
		log "extracting $(basename "$deb")"
		rm -rf "$dir" && mkdir -p "$dir"
		dpkg-deb -x "$deb" "$dir"
		touch "$dir/.extracted"
	fi
	printf '%s\n' "$dir"
}

# resolve_kernel PKG -> the package that ships /boot/vmlinuz-* (follows metapackage Depends).
resolve_kernel() {
	local pkg=$1 dep _
	for _ in 1 2 3 4; do
		# A real image package has no Depends on another linux-image-*; a metapackage does.
		dep=$(apt-cache "${APT_OPTS[@]}" depends --no-recommends --no-suggests "$pkg" 2>/dev/null |
			awk '$1 == "Depends:" && $2 ~ /^linux-image-/ {print $2; exit}')
		if [[ -z $dep ]]; then
			printf '%s\n' "$pkg"
			return
		fi
		pkg=$dep
	done
	die "cannot resolve kernel package $1"
}

# --- kernel -----------------------------------------------------------------------------------
candidate_version "$KERNEL_PACKAGE" >/dev/null
KPKG=$(resolve_kernel "$KERNEL_PACKAGE")
KDEB=$(fetch "$KPKG")
KROOT=$(extract "$KDEB")
VMLINUZ_SRC=$(find "$KROOT/boot" -maxdepth 1 -name 'vmlinuz-*' -print -quit)
[[ -n $VMLINUZ_SRC ]] || die "$KPKG ships no /boot/vmlinuz-*"
KVER=${VMLINUZ_SRC##*/vmlinuz-}
[[ -d $KROOT/lib/modules/$KVER ]] || die "$KPKG has no /lib/modules/$KVER"
log "kernel $KPKG -> $KVER"

# The .deb has no modules.dep: generate it once in the cached extraction.
if [[ ! -e $KROOT/lib/modules/$KVER/.depmod-done ]]; then
	log "depmod $KVER"
	depmod -b "$KROOT" "$KVER"
	touch "$KROOT/lib/modules/$KVER/.depmod-done"
fi

u32le() { od -An -tu4 -j "$2" -N4 "$1" | tr -d ' '; }
u8() { od -An -tu1 -j "$2" -N1 "$1" | tr -d ' '; }

# payload_format FILE -> lz4|zstd|gzip|xz|unknown, by the first bytes.
payload_format() {
	case $(od -An -tx1 -N4 "$1" | tr -d ' \n') in
	02214c18) echo lz4 ;;
	28b52ffd) echo zstd ;;
	1f8b*) echo gzip ;;
	fd377a58) echo xz ;;
	*) echo unknown ;;
	esac
}

# extract_vmlinux BZIMAGE DEST -> prints the compression; DEST is an ELF.
extract_vmlinux() {
	local bz=$1 dest=$2 setup pm off len fmt magic expect='' rc=0
	local payload="$TMP/payload"
	[[ $(od -An -c -j $((0x202)) -N4 "$bz" | tr -d ' ') == HdrS ]] || die "$bz: not a bzImage"
	setup=$(u8 "$bz" $((0x1f1)))
	((setup)) || setup=4
	pm=$(((setup + 1) * 512))
	off=$(u32le "$bz" $((0x248)))
	len=$(u32le "$bz" $((0x24c)))
	# The boot header locates the payload exactly (boot protocol >= 2.08); the kernel build
	# appends the uncompressed size (le32) after the compressed stream, so drop those 4 bytes.
	tail -c +$((pm + off + 1)) "$bz" | head -c $((len - 4)) >"$payload"
	expect=$(u32le "$bz" $((pm + off + len - 4)))
	fmt=$(payload_format "$payload")
	if [[ $fmt == unknown ]]; then
		expect=
		# Fallback: scan for a known magic.
		for magic in '\x02\x21\x4c\x18' '\x28\xb5\x2f\xfd'; do
			off=$(LC_ALL=C grep -obUaP -m1 "$magic" "$bz" | head -n1 | cut -d: -f1) || true
			[[ -n $off ]] && break
		done
		[[ -n $off ]] || die "$bz: no LZ4/zstd payload found"
		tail -c +$((off + 1)) "$bz" >"$payload"
		fmt=$(payload_format "$payload")
	fi
	case $fmt in
	lz4) lz4 -dc <"$payload" >"$dest.tmp" 2>"$TMP/decompress.err" || rc=$? ;;
	zstd) zstd -dcq <"$payload" >"$dest.tmp" 2>"$TMP/decompress.err" || rc=$? ;;
	gzip) gzip -dc <"$payload" >"$dest.tmp" 2>"$TMP/decompress.err" || rc=$? ;;
	xz) xz -dc <"$payload" >"$dest.tmp" 2>"$TMP/decompress.err" || rc=$? ;;
	*) die "$bz: unsupported payload format" ;;
	esac
	if [[ -n $expect ]]; then
		# Exact payload from the header: decompression must succeed and match the size the
		# kernel build appended. (A magic-scan payload has trailing bytes; rely on the ELF check.)
		((rc == 0)) || die "$bz: $fmt decompression failed: $(cat "$TMP/decompress.err")"
		[[ $(stat -c %s "$dest.tmp") == "$expect" ]] ||
			die "$bz: decompressed $(stat -c %s "$dest.tmp") bytes, header says $expect"
	fi
	[[ $(od -An -tx1 -N4 "$dest.tmp" | tr -d ' \n') == 7f454c46 ]] ||
		die "$bz: decompressed $fmt payload is not an ELF"
	file -b "$dest.tmp" | grep -q '^ELF 64-bit' || die "$bz: payload is not a 64-bit ELF"
	mv "$dest.tmp" "$dest"
	printf '%s\n' "$fmt"
}

SELF_HASH=$(sha256sum <"${BASH_SOURCE[0]}" | cut -c1-16)
INIT_HASH=$(sha256sum <"$SELF_DIR/init" | cut -c1-16)
KCOMP=
key="$(basename "$KDEB") $SELF_HASH"
if ! fresh "$OUT/vmlinux" "$key"; then
	log "extracting vmlinux from vmlinuz-$KVER"
	KCOMP=$(extract_vmlinux "$VMLINUZ_SRC" "$OUT/vmlinux")
	stamp "$OUT/vmlinux" "$key"
	printf '%s\n' "$KCOMP" >"$OUT/.stamps/kernel-compression"
fi
KCOMP=$(cat "$OUT/.stamps/kernel-compression" 2>/dev/null || echo unknown)
if ! fresh "$OUT/vmlinuz" "$key"; then
	cp "$VMLINUZ_SRC" "$OUT/vmlinuz.tmp" && mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
	stamp "$OUT/vmlinuz" "$key"
fi

# Drop initrds made for another kernel: they would not match vmlinux.
for f in "$OUT"/initrd-*.gz; do
	[[ -e $f ]] || continue
	s="$OUT/.stamps/$(basename "$f")"
	if [[ ! -f $s ]] || [[ $(<"$s") != "$(basename "$KDEB") "* ]]; then
		log "removing $(basename "$f") (built for another kernel)"
		rm -f "$f" "$s"
	fi
done

# --- firmware ---------------------------------------------------------------------------------
BIOS_DEB=$(fetch seabios)
if ! fresh "$OUT/bios-256k.bin" "$(basename "$BIOS_DEB")"; then
	BIOS_ROOT=$(extract "$BIOS_DEB")
	cp "$BIOS_ROOT/usr/share/seabios/bios-256k.bin" "$OUT/bios-256k.bin"
	stamp "$OUT/bios-256k.bin" "$(basename "$BIOS_DEB")"
fi

# --- initramfs --------------------------------------------------------------------------------
BB_DEB=$(fetch busybox-static)
INITRD="$OUT/initrd-$NAME.gz"
if [[ -n $SCRIPT ]]; then
	SCRIPT_HASH=$(sha256sum <"$SCRIPT" | cut -c1-16)
else
	SCRIPT_HASH=builtin
fi
read -ra MODS <<<"$MODULES"
mapfile -t MODS < <(printf '%s\n' "${MODS[@]}" | awk 'NF && !seen[$0]++')
MODULES="${MODS[*]}"
key="$(basename "$KDEB") $(basename "$BB_DEB") $SELF_HASH $INIT_HASH $SCRIPT_HASH modules=$MODULES"
if ! fresh "$INITRD" "$key"; then
	log "building $(basename "$INITRD") (modules: $MODULES)"
	BB_ROOT=$(extract "$BB_DEB")
	R="$TMP/initramfs"
	mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,mnt,etc,root}
	chmod 1777 "$R/tmp"
	cp "$BB_ROOT/bin/busybox" "$R/bin/busybox"
	# Symlinks for every applet, made on the host with busybox's own list.
	while read -r applet; do
		[[ $applet == bin/busybox || -e $R/$applet ]] && continue
		mkdir -p "$R/$(dirname "$applet")"
		ln -s /bin/busybox "$R/$applet"
	done < <("$R/bin/busybox" --list-full)
	if [[ $(id -u) == 0 ]]; then
		mknod -m 600 "$R/dev/console" c 5 1
		mknod -m 666 "$R/dev/null" c 1 3
	fi

	# Modules plus their dependencies (and softdeps), resolved by kmod against the full tree.
	MD="lib/modules/$KVER"
	mkdir -p "$R/$MD"
	: >"$TMP/modfiles"
	for m in "${MODS[@]}"; do
		deps=$(modprobe -d "$KROOT" -S "$KVER" --show-depends "$m" 2>"$TMP/modprobe.err") ||
			die "module $m not found for $KVER: $(cat "$TMP/modprobe.err")"
		awk '$1 == "insmod" {print $2}' <<<"$deps" >>"$TMP/modfiles"
		grep -q '^builtin ' <<<"$deps" && log "module $m is built into $KVER"
	done
	sort -u "$TMP/modfiles" | while read -r path; do
		rel=${path#"$KROOT"/}
		rel=${rel#/}
		mkdir -p "$R/$(dirname "$rel")"
		case $rel in
		# Decompress so busybox modprobe/insmod need no xz/zstd support; the signature
		# is inside the compressed data, so it survives.
		*.ko.xz) xz -dc "$path" >"$R/${rel%.xz}" ;;
		*.ko.zst) zstd -dcq "$path" >"$R/${rel%.zst}" ;;
		*.ko.gz) gzip -dc "$path" >"$R/${rel%.gz}" ;;
		*.ko) cp "$path" "$R/$rel" ;;
		*) die "unexpected module file $path" ;;
		esac
	done
	for f in modules.order modules.builtin modules.builtin.modinfo; do
		[[ -e $KROOT/$MD/$f ]] && cp "$KROOT/$MD/$f" "$R/$MD/"
	done
	depmod -b "$R" "$KVER"

	cp "$SELF_DIR/init" "$R/init"
	chmod 755 "$R/init"
	printf '%s\n' "${MODS[@]}" >"$R/etc/iovirt-modules"
	if [[ -n $SCRIPT ]]; then
		cp "$SCRIPT" "$R/test.sh"
	else
		cat >"$R/test.sh" <<'EOF'
#!/bin/sh
echo "iovirt guest: $(cat /proc/version)"
EOF
	fi
	chmod 755 "$R/test.sh"
	printf 'KERNEL_RELEASE=%s\nNAME=%s\n' "$KVER" "$NAME" >"$R/etc/iovirt-guest"

	(cd "$R" && find . -mindepth 1 | LC_ALL=C sort |
		cpio --quiet --reproducible -o -H newc -R 0:0) | gzip -n -6 >"$INITRD.tmp"
	mv "$INITRD.tmp" "$INITRD"
	stamp "$INITRD" "$key"
fi

# --- manifest ---------------------------------------------------------------------------------
{
	printf 'KERNEL_RELEASE=%s\n' "$KVER"
	printf 'KERNEL_PACKAGE=%s\n' "$KPKG"
	printf 'KERNEL_DEB=%s\n' "$(basename "$KDEB")"
	printf 'KERNEL_COMPRESSION=%s\n' "$KCOMP"
	printf 'BUSYBOX_DEB=%s\n' "$(basename "$BB_DEB")"
	printf 'SEABIOS_DEB=%s\n' "$(basename "$BIOS_DEB")"
	printf 'INITRDS="%s"\n' "$(cd "$OUT" && find . -maxdepth 1 -name 'initrd-*.gz' -printf '%f\n' | sort | tr '\n' ' ' | sed 's/ $//')"
} >"$OUT/manifest.txt.tmp"
mv "$OUT/manifest.txt.tmp" "$OUT/manifest.txt"

log "done: $OUT (kernel $KVER)"
printf '%s\n' "$INITRD"

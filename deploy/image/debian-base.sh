#!/usr/bin/env bash
# Make the offline base image localhost/debian-min:bookworm: a debootstrap'd Debian 12 minbase rootfs
# from the apt mirror this machine is configured with, imported into buildah's store under .buildah/.
# Needed where no container registry is reachable (the Dockerfile's default base is on Docker Hub).
# Runs as root (debootstrap). Takes about 40 s. Usage: deploy/image/debian-base.sh [IMAGE]
set -euo pipefail
cd "$(dirname "$0")/../.."
IMAGE=${1:-localhost/debian-min:bookworm}
STORE=${BREAKFIX_BUILDAH_DIR:-$PWD/.buildah}
B=(buildah --root "$STORE/storage" --runroot "$STORE/runroot" --storage-driver vfs)
if "${B[@]}" inspect --type image "$IMAGE" >/dev/null 2>&1; then
  echo "debian-base: $IMAGE already in $STORE"; exit 0
fi
command -v debootstrap >/dev/null || {
  echo "debian-base: installing debootstrap (apt)"; apt-get install -y -qq --no-install-recommends debootstrap >/dev/null; }
# the mirror apt already uses (deb822 .sources or a classic sources.list line)
MIRROR=$(grep -hoE '^URIs: *\S+' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -1 || true)
[ -n "$MIRROR" ] || MIRROR=$(grep -hoE '^deb +\S+' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | head -1 || true)
MIRROR=${MIRROR:-http://deb.debian.org/debian}
ROOTFS="$STORE/rootfs"
rm -rf "$ROOTFS" && mkdir -p "$ROOTFS"
echo "debian-base: debootstrap --variant=minbase bookworm from $MIRROR"
debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR" >"$STORE/debootstrap.log" 2>&1 || {
  tail -20 "$STORE/debootstrap.log"; exit 1; }
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
ctr=$("${B[@]}" from scratch)
"${B[@]}" copy "$ctr" "$ROOTFS/" / >/dev/null
"${B[@]}" config --cmd /bin/bash --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
"${B[@]}" commit --quiet "$ctr" "$IMAGE" >/dev/null
"${B[@]}" rm "$ctr" >/dev/null
rm -rf "$ROOTFS"
echo "debian-base: $IMAGE ready"

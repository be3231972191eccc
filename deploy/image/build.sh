#!/usr/bin/env bash
# Build the breakfix image from the repository's Dockerfile with Debian's buildah, daemonless:
# chroot isolation (no runc/crun needed), vfs storage under .buildah/ (nothing in /var/lib/containers).
# Usage: deploy/image/build.sh [IMAGE] [BASE]   (make image IMAGE=... BASE_IMAGE=...)
# BASE defaults to the offline Debian base (made by debian-base.sh when missing); pass
# BASE=default to build from the Dockerfile's pinned python:3.11-slim-bookworm digest instead.
# Export for a cluster: buildah ... push IMAGE docker-archive:breakfix.tar:IMAGE (then load/push it).
set -euo pipefail
cd "$(dirname "$0")/../.."
IMAGE=${1:-localhost/breakfix:dev}
BASE=${2:-localhost/debian-min:bookworm}
STORE=${BREAKFIX_BUILDAH_DIR:-$PWD/.buildah}
B=(buildah --root "$STORE/storage" --runroot "$STORE/runroot" --storage-driver vfs)
args=()
if [ "$BASE" != default ]; then
  [[ "$BASE" != localhost/debian-min:* ]] || deploy/image/debian-base.sh "$BASE"
  args+=(--build-arg "BASE=$BASE")
fi
# the CA pip trusts here (a proxy's, for instance) reaches the build as a secret, not a layer
CA=${PIP_CERT:-$(python3 -m pip config get global.cert 2>/dev/null || true)}
[ -z "$CA" ] || [ ! -s "$CA" ] || args+=(--secret "id=pip_ca,src=$CA")
"${B[@]}" bud --isolation chroot --layers=false "${args[@]}" -f Dockerfile -t "$IMAGE" .
"${B[@]}" images "$IMAGE"

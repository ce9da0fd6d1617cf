#!/usr/bin/env bash
# Installs, from Debian's archive, everything the test registry and the fixture builds use.
#
# Idempotent: when every package is present and the arm64 package index is known, it touches
# nothing, so running it before every test run is cheap.
set -euo pipefail

packages=(
    docker-registry   # the CNCF distribution registry the tests talk to
    umoci skopeo buildah  # independent writers of OCI images
    debootstrap busybox-static  # the fixtures' contents come from real Debian packages
    apache2-utils     # htpasswd, to write a bcrypt password file for the registry
    python3 python3-cryptography  # the token service signs its JWTs with python3-cryptography
    openssl jq curl ca-certificates
    postgresql-client # psql, which the postgres VM test talks to the guest with
    redis-tools       # redis-cli, which the redis VM test talks to the guest with
)

missing=()
for pkg in "${packages[@]}"; do
    if [[ $(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null) != "install ok installed" ]]; then
        missing+=("$pkg")
    fi
done

# The arm64 half of the multi-platform fixture is Debian's own arm64 busybox-static, fetched with
# `apt-get download busybox-static:arm64`; that needs the foreign architecture in dpkg and its
# package index in apt.
need_update=false
add_arm64=false
if ! [[ $'\n'$(dpkg --print-foreign-architectures)$'\n' == *$'\n'arm64$'\n'* ]]; then
    add_arm64=true
    need_update=true
fi
# Both halves need a package index; a machine with cleaned apt lists has neither. Looking for the
# index files is instant, where asking apt-cache costs a second (this image does not keep apt's
# binary cache).
native_arch=$(dpkg --print-architecture)
for arch in "$native_arch" arm64; do
    if ! compgen -G "/var/lib/apt/lists/*_binary-${arch}_Packages*" >/dev/null; then
        need_update=true
    fi
done
if [[ ${#missing[@]} -gt 0 ]]; then
    need_update=true
fi

if ! $need_update; then
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    echo "install.sh: must run as root to install: ${missing[*]:-the arm64 package index}" >&2
    exit 1
fi

if $add_arm64; then
    dpkg --add-architecture arm64
fi
export DEBIAN_FRONTEND=noninteractive
# A third-party source that cannot be reached makes apt-get update fail although Debian's own
# indexes were refreshed; the install below is the real test of whether we have what we need.
if ! apt-get update -q; then
    echo "install.sh: apt-get update reported errors; continuing with the indexes it got" >&2
fi
if [[ ${#missing[@]} -gt 0 ]]; then
    # With Recommends, as a plain `apt-get install` would: buildah's (fuse-overlayfs, an OCI
    # runtime) are what its users expect to find.
    apt-get install -y -q "${missing[@]}"
fi
# Captured rather than piped into grep -q: an early grep exit would kill apt-cache with SIGPIPE
# and pipefail would turn that into a failure.
policy=$(apt-cache policy "busybox-static:$native_arch" busybox-static:arm64)
if [[ $(grep -c 'Candidate: [0-9]' <<<"$policy") -ne 2 ]]; then
    echo "install.sh: apt has no busybox-static for both $native_arch and arm64" >&2
    exit 1
fi

#!/usr/bin/env bash
# Prints the sha256 of the `--format tar` output of every fixture image, through every transport
# that reaches it (the loopback registry, the OCI layout, an oci-archive and a docker-archive),
# and of every conformance archive, one "NAME DIGEST" line each. Two builds of oci2uk that print
# the same lines write the same tar bytes:
#
#   scripts/tar-digests.sh OLD_BINARY > old.txt; scripts/tar-digests.sh NEW_BINARY > new.txt
#   diff old.txt new.txt
#
# Needs the test registry (testregistry/up.sh) and its fixtures.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "${1:?usage: $0 OCI2UK_BINARY}")
# shellcheck disable=SC1091
source "${OCI2UK_TESTREG_DIR:-/tmp/oci2uk-testreg}/env"
layout=$(testregistry/fixtures.sh path)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export SOURCE_DATE_EPOCH=
unset SOURCE_DATE_EPOCH

digest() { # NAME SOURCE [oci2uk options]
    local name=$1 src=$2
    shift 2
    local d
    if d=$("$bin" build "$src" --format tar -o - --quiet --cache "$work/cache" "$@" 2>"$work/err" | sha256sum); then
        echo "$name ${d%% *}"
    else
        echo "$name error: $(head -c 300 "$work/err" | tr '\n' ' ')"
    fi
}

for tag in $(jq -r '.manifests[].annotations["org.opencontainers.image.ref.name"] // empty' "$layout/index.json" | sort -u); do
    digest "oci:$tag" "oci:$layout:$tag"
done
for ref in busybox:latest busybox:arm64 multi:latest nginx:latest nginx:zstd nginx:raw nginx:docker guestcheck:latest; do
    digest "registry:$ref" "$OCI2UK_TEST_REGISTRY/$ref"
done
for tag in busybox nginx guestcheck; do
    skopeo copy -q "oci:$layout:$tag" "oci-archive:$work/$tag.oci.tar:$tag"
    digest "oci-archive:$tag" "oci-archive:$work/$tag.oci.tar"
    skopeo copy -q "oci:$layout:$tag" "docker-archive:$work/$tag.docker.tar:fixture/$tag:latest"
    digest "docker-archive:$tag" "docker-archive:$work/$tag.docker.tar"
done
for f in ../shared/conformance/go-containerregistry/*.tar; do
    digest "conformance:$(basename "$f")" "docker-archive:$f"
done
for n in 0 1; do
    digest "conformance:test_link.tar:@$n" "docker-archive:../shared/conformance/go-containerregistry/test_link.tar:@$n"
done

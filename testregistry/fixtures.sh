#!/usr/bin/env bash
# Builds the fixture images into one OCI image layout and pushes them to the test registries.
#
#   fixtures.sh path    print where the layout is (or will be) cached; builds nothing
#   fixtures.sh build   build the layout unless it is cached; print its path
#   fixtures.sh push    build, then push to the registries named by the OCI2UK_TEST_* variables
#                       (up.sh sets them; by hand, source STATE_DIR/env first)
#
# The images come from real Debian packages and are written by tools that share no code with
# oci2uk (umoci, skopeo, jq), so a test that compares oci2uk's result with them proves something.
#
# Layout tags:   busybox (linux/amd64)  busybox-arm64  multi (index of both)
#                nginx (gzip)  nginx-zstd  nginx-raw (uncompressed layers); no nginx-docker,
#                see build()
#                guestcheck (busybox plus a layer with guestcheck/check.sh, for the VM tests)
#                postgres (Debian's postgresql-15 on the nginx image's base layer; layout only)
#                redis (Debian's redis-server on the same base layer; layout only)
# Registry names: busybox:latest busybox:arm64 multi:latest
#                 nginx:latest nginx:zstd nginx:raw nginx:docker (Docker schema 2)
#                 guestcheck:latest
#
# The layout is cached under ${OCI2UK_FIXTURE_CACHE:-~/.cache/oci2uk-fixtures}/KEY/layout, KEY
# being a hash of this script and the files it puts into images: debootstrap takes minutes, and
# an unchanged recipe gives the same images, so only a change here rebuilds.
set -Eeuo pipefail
# set -e alone exits silently; say where.
trap 'printf "fixtures: error: line %s: %s failed\n" "$LINENO" "$BASH_COMMAND" >&2' ERR

script=$(readlink -f "${BASH_SOURCE[0]}")
here=$(dirname "$script")
cache_root=${OCI2UK_FIXTURE_CACHE:-$HOME/.cache/oci2uk-fixtures}
arch=$(dpkg --print-architecture)
# The guestcheck image's script.
guestcheck_script=$here/guestcheck/check.sh
# The host architecture is part of the key because debootstrap builds the nginx image for it.
key=$({ cat "$script" "$guestcheck_script"; echo "$arch"; } | sha256sum | cut -c1-16)
final=$cache_root/$key
layout=$final/layout

log() { printf 'fixtures: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# The applets the busybox images link to. A fixed list rather than `busybox --list`, because the
# arm64 binary cannot run here and both halves of the index should have the same tree.
applets=(
    ash awk basename cat chmod chown cp cut date dd df dirname du echo env expr false find grep
    gzip head hostname id ip kill ln ls mkdir mount mv nc ping ps pwd readlink rm rmdir sed sh
    sleep sort stat tail tar tee test touch tr true umount uname vi wc wget which xargs
)

# --- building -------------------------------------------------------------------------------

# fetch_deb PACKAGE:ARCH DIR: download one Debian package and unpack it (not install it) into DIR.
fetch_deb() {
    local pkg=$1 dir=$2
    mkdir -p "$dir/deb"
    # apt drops privileges to _apt for downloads, which cannot write into our root-owned scratch
    # directory; the download is verified against the signed index either way.
    (cd "$dir" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >&2)
    dpkg-deb -x "$dir"/*.deb "$dir/deb"
}

# build_busybox ARCH TAG: a one-layer image holding Debian's static busybox for ARCH.
build_busybox() {
    local barch=$1 tag=$2
    local dir=$scratch/busybox-$barch
    fetch_deb "busybox-static:$barch" "$dir"

    umoci new --image "$oci:$tag"
    umoci unpack --image "$oci:$tag" "$dir/bundle" >/dev/null
    local root=$dir/bundle/rootfs
    mkdir -p "$root/bin" "$root/etc" "$root/root" "$root/tmp"
    chmod 0700 "$root/root"
    chmod 1777 "$root/tmp"
    cp -p "$dir/deb/bin/busybox" "$root/bin/busybox"
    local applet
    for applet in "${applets[@]}"; do
        ln -s busybox "$root/bin/$applet"
    done
    # A passwd and group file give user-resolution tests names to resolve inside the image.
    cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
    cat >"$root/etc/group" <<'EOF'
root:x:0:
daemon:x:1:
nogroup:x:65534:
EOF
    umoci repack --image "$oci:$tag" --history.created_by "busybox-static:$barch from Debian bookworm" \
        "$dir/bundle"
    umoci config --image "$oci:$tag" --os linux --architecture "$barch" \
        --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --config.cmd sh --history.created_by 'CMD ["sh"]'
    rm -rf --one-file-system "$dir"
}

# The nginx image: a trimmed debootstrap base, an nginx layer that also deletes base content
# (whiteouts), and a layer from `umoci insert --opaque` (an opaque directory).
build_nginx() {
    umoci new --image "$oci:nginx"

    # Layer 1: Debian bookworm minbase, trimmed the way Debian's slim container images are.
    local b1=$scratch/nginx-base
    umoci unpack --image "$oci:nginx" "$b1" >/dev/null
    local root=$b1/rootfs
    log "debootstrap --variant=minbase bookworm (a minute or more)"
    debootstrap --variant=minbase bookworm "$root" >"$scratch/debootstrap.log" 2>&1 ||
        { tail -n 30 "$scratch/debootstrap.log" >&2; die "debootstrap failed"; }
    rm -rf "${root:?}"/var/lib/apt/lists/* "${root:?}"/var/cache/apt/* "${root:?}"/var/cache/debconf/*-old \
        "${root:?}"/var/lib/dpkg/*-old "${root:?}"/usr/share/doc/* "${root:?}"/usr/share/man/* \
        "${root:?}"/usr/share/info/* "${root:?}"/usr/share/locale/* "${root:?}"/usr/share/lintian/* \
        "${root:?}"/var/log/*.log "${root:?}"/var/log/apt/* "${root:?}"/tmp/* "${root:?}"/var/tmp/*
    # Device nodes come from the runtime (devtmpfs, in oci2uk's init), and the host's resolver
    # and hostname, which debootstrap copied in, do not belong in an image.
    rm -rf "${root:?}"/dev/* "$root/etc/resolv.conf" "$root/etc/hostname"
    # Keep later package installs from bringing the documentation back.
    cat >"$root/etc/dpkg/dpkg.cfg.d/slim" <<'EOF'
path-exclude /usr/share/doc/*
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
EOF
    umoci repack --image "$oci:nginx" --history.created_by "debootstrap --variant=minbase bookworm" "$b1"
    rm -rf --one-file-system "$b1"
    # The postgres and redis images start from this same layer: one debootstrap for all three.
    umoci tag --image "$oci:nginx" postgres
    umoci tag --image "$oci:nginx" redis

    # Layer 2: nginx from Debian, configured like the official image, plus deliberate deletions
    # and hardlinks so that flatten has whiteouts and link groups to get right.
    local b2=$scratch/nginx-app
    umoci unpack --image "$oci:nginx" "$b2" >/dev/null
    root=$b2/rootfs
    # What apt and maintainer scripts need in the chroot, all removed again before repacking
    # (they were not in layer 1, so removing them leaves no whiteout). Device nodes instead of a
    # bind mount of /dev: nothing mounted means a failed build cannot delete through a mount.
    mknod -m 0666 "$root/dev/null" c 1 3
    mknod -m 0666 "$root/dev/zero" c 1 5
    mknod -m 0666 "$root/dev/random" c 1 8
    mknod -m 0666 "$root/dev/urandom" c 1 9
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    printf '#!/bin/sh\n# no services start while building an image\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 0755 "$root/usr/sbin/policy-rc.d"
    log "installing nginx in the chroot"
    local chroot_env=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8)
    {
        chroot "$root" "${chroot_env[@]}" apt-get update -q &&
            chroot "$root" "${chroot_env[@]}" apt-get install -y -q --no-install-recommends nginx
    } >"$scratch/apt.log" 2>&1 || { tail -n 30 "$scratch/apt.log" >&2; die "installing nginx failed"; }
    rm -rf "${root:?}"/var/lib/apt/lists/* "${root:?}"/var/cache/apt/* "${root:?}"/var/cache/debconf/*-old \
        "${root:?}"/var/lib/dpkg/*-old "${root:?}"/var/log/*.log "${root:?}"/var/log/apt/* \
        "${root:?}"/dev/* "$root/etc/resolv.conf" "$root/usr/sbin/policy-rc.d"

    # As the official nginx image does, log to the container's stdout and stderr.
    ln -sf /dev/stdout "$root/var/log/nginx/access.log"
    ln -sf /dev/stderr "$root/var/log/nginx/error.log"
    # Whiteouts: a file and a non-empty directory of layer 1.
    rm "$root/etc/motd"
    rm -r "$root/etc/cron.daily"
    # A hardlink group of three, across two directories, made in this layer. (Layer 1 has its
    # own: Debian ships usr/bin/perl and usr/bin/perl5.36.0, usr/bin/gunzip and
    # usr/bin/uncompress as hardlinks.)
    mkdir -p "$root/usr/local/share/oci2uk/links" "$root/usr/local/share/oci2uk/more-links"
    printf 'one file, three names\n' >"$root/usr/local/share/oci2uk/links/a"
    ln "$root/usr/local/share/oci2uk/links/a" "$root/usr/local/share/oci2uk/links/b"
    ln "$root/usr/local/share/oci2uk/links/a" "$root/usr/local/share/oci2uk/more-links/c"
    # An extended attribute, which umoci carries as a SCHILY.xattr pax record.
    printf 'this file has the xattr user.oci2uk=fixture\n' >"$root/usr/local/share/oci2uk/xattr"
    /usr/bin/python3 -c 'import os, sys; os.setxattr(sys.argv[1], "user.oci2uk", b"fixture")' \
        "$root/usr/local/share/oci2uk/xattr"
    umoci repack --image "$oci:nginx" --history.created_by "apt-get install nginx; rm /etc/motd /etc/cron.daily" "$b2"
    rm -rf --one-file-system "$b2"

    # Layer 3: replace the default site's content wholesale; `--opaque` writes
    # var/www/html/.wh..wh..opq, so Debian's index.nginx-debian.html must disappear.
    local html=$scratch/html
    mkdir -p "$html"
    printf '<!DOCTYPE html>\n<title>oci2uk</title>\n<p>Hello from the oci2uk nginx fixture.</p>\n' \
        >"$html/index.html"
    # umoci 0.4.7's insert ends its tar stream right after the last file's bytes: no padding to
    # the 512-byte block, no end-of-archive blocks (GNU tar and Python's tarfile reject it; umoci
    # itself does not notice). So insert into a scratch tag, complete the tar, and append it with
    # `umoci raw add-layer`: the entries are still exactly the ones umoci insert wrote.
    umoci insert --image "$oci:nginx" --tag opaque-scratch --opaque "$html" /var/www/html
    local m
    m=$(tag_digest opaque-scratch "$oci")
    zcat "$oci/blobs/sha256/$(jq -r '.layers[-1].digest' "$oci/blobs/sha256/${m#sha256:}" | cut -d: -f2)" \
        >"$scratch/opaque.tar"
    complete_tar "$scratch/opaque.tar"
    umoci rm --image "$oci:opaque-scratch"
    umoci raw add-layer --image "$oci:nginx" --history.created_by "umoci insert --opaque html /var/www/html" \
        "$scratch/opaque.tar"

    umoci config --image "$oci:nginx" --os linux --architecture "$arch" \
        --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --config.cmd nginx --config.cmd -g --config.cmd 'daemon off;' \
        --config.exposedports 80/tcp --config.stopsignal SIGQUIT \
        --config.label org.opencontainers.image.title=oci2uk-nginx-fixture \
        --history.created_by 'CMD ["nginx" "-g" "daemon off;"]'
}

# The postgres image: the nginx image's base layer, then Debian's postgresql-15, set up the way
# the official postgres image is: an entrypoint that makes a database cluster in an empty $PGDATA
# (a new volume) and then runs postgres as the postgres user, stopped by SIGINT (fast shutdown).
build_postgres() {
    local b=$scratch/postgres
    umoci unpack --image "$oci:postgres" "$b" >/dev/null
    local root=$b/rootfs
    # As for nginx: what apt and maintainer scripts need, removed again before repacking.
    mknod -m 0666 "$root/dev/null" c 1 3
    mknod -m 0666 "$root/dev/zero" c 1 5
    mknod -m 0666 "$root/dev/random" c 1 8
    mknod -m 0666 "$root/dev/urandom" c 1 9
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    printf '#!/bin/sh\n# no services start while building an image\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 0755 "$root/usr/sbin/policy-rc.d"
    # No cluster in /var/lib/postgresql/15/main from the package's postinst: the entrypoint makes
    # one in $PGDATA, as the official image does.
    mkdir -p "$root/etc/postgresql-common"
    printf 'create_main_cluster = false\n' >"$root/etc/postgresql-common/createcluster.conf"
    log "installing postgresql-15 in the chroot"
    local chroot_env=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8)
    {
        chroot "$root" "${chroot_env[@]}" apt-get update -q &&
            chroot "$root" "${chroot_env[@]}" apt-get install -y -q --no-install-recommends postgresql-15
    } >"$scratch/apt-postgres.log" 2>&1 ||
        { tail -n 30 "$scratch/apt-postgres.log" >&2; die "installing postgresql-15 failed"; }
    [[ -x $root/usr/bin/setpriv ]] || die "postgres: no setpriv in the chroot"
    [[ -x $root/usr/lib/postgresql/15/bin/postgres ]] || die "postgres: no postgres binary"
    # Slimmer: the JIT (LLVM and its libz3, over 120 MB; postgres runs without JIT when its
    # provider is missing) and the locale sources (the cluster uses C.UTF-8, built into glibc).
    rm -rf "${root:?}"/usr/lib/postgresql/15/lib/llvmjit* "${root:?}"/usr/lib/postgresql/15/lib/bitcode \
        "${root:?}"/usr/lib/*-linux-gnu/libLLVM-*.so* "${root:?}"/usr/lib/*-linux-gnu/libz3.so* \
        "${root:?}"/usr/share/i18n/*
    rm -rf "${root:?}"/var/lib/apt/lists/* "${root:?}"/var/cache/apt/* "${root:?}"/var/cache/debconf/*-old \
        "${root:?}"/var/lib/dpkg/*-old "${root:?}"/var/log/*.log "${root:?}"/var/log/apt/* \
        "${root:?}"/dev/* "$root/etc/resolv.conf" "$root/usr/sbin/policy-rc.d"
    # $PGDATA belongs to postgres in the image, so a volume seeded from it does too.
    mkdir -p "$root/var/lib/postgresql/data"
    chroot "$root" chown postgres:postgres /var/lib/postgresql/data
    chmod 0700 "$root/var/lib/postgresql/data"
    cat >"$root/usr/local/bin/docker-entrypoint.sh" <<'EOF'
#!/bin/sh
# The oci2uk postgres fixture's entrypoint, after the official image's docker-entrypoint.sh:
# runs as root, makes a database cluster when $PGDATA holds none, then runs the command (postgres)
# as the postgres user. setpriv (util-linux) stands in for gosu.
set -eu
: "${PGDATA:=/var/lib/postgresql/data}"
export PGDATA
as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }

# The socket directory is on /run, a tmpfs in the guest.
mkdir -p "$PGDATA" /var/run/postgresql
chown postgres:postgres "$PGDATA" /var/run/postgresql
chmod 0700 "$PGDATA"
chmod 2775 /var/run/postgresql

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    # A new ext4 volume holds an empty lost+found, and initdb wants an empty directory.
    if [ -d "$PGDATA/lost+found" ]; then rmdir "$PGDATA/lost+found"; fi
    echo "docker-entrypoint: initializing a database cluster in $PGDATA"
    as_postgres initdb --username=postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8 -D "$PGDATA"
    # A test fixture: any host may connect as any user, with no password. Never do this with
    # data that matters.
    printf '%s\n' 'host all all 0.0.0.0/0 trust' 'host all all ::/0 trust' >>"$PGDATA/pg_hba.conf"
    printf '%s\n' "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
    echo "docker-entrypoint: database cluster ready"
else
    echo "docker-entrypoint: $PGDATA holds a database; skipping initialization"
fi

if [ "${1:-}" = postgres ]; then
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$@"
fi
exec "$@"
EOF
    chmod 0755 "$root/usr/local/bin/docker-entrypoint.sh"
    umoci repack --image "$oci:postgres" \
        --history.created_by "apt-get install --no-install-recommends postgresql-15; docker-entrypoint.sh" "$b"
    rm -rf --one-file-system "$b"
    umoci config --image "$oci:postgres" --os linux --architecture "$arch" \
        --config.env PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --config.env PGDATA=/var/lib/postgresql/data --config.env LANG=C.UTF-8 \
        --config.entrypoint docker-entrypoint.sh --config.cmd postgres \
        --config.exposedports 5432/tcp --config.stopsignal SIGINT --config.volume /var/lib/postgresql/data \
        --config.label org.opencontainers.image.title=oci2uk-postgres-fixture \
        --history.created_by 'ENTRYPOINT ["docker-entrypoint.sh"]; CMD ["postgres"]; STOPSIGNAL SIGINT; EXPOSE 5432'
}

# The redis image: the nginx image's base layer, then Debian's redis-server (redis 7.0), run the
# way the official image runs it: redis-server in the foreground as the redis user, in /data,
# reachable from outside the VM (no protected mode, every address), stopped by SIGTERM (which
# redis answers by shutting down cleanly).
build_redis() {
    local b=$scratch/redis
    umoci unpack --image "$oci:redis" "$b" >/dev/null
    local root=$b/rootfs
    # As for nginx: what apt and maintainer scripts need, removed again before repacking.
    mknod -m 0666 "$root/dev/null" c 1 3
    mknod -m 0666 "$root/dev/zero" c 1 5
    mknod -m 0666 "$root/dev/random" c 1 8
    mknod -m 0666 "$root/dev/urandom" c 1 9
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    printf '#!/bin/sh\n# no services start while building an image\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 0755 "$root/usr/sbin/policy-rc.d"
    log "installing redis-server in the chroot"
    local chroot_env=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8)
    {
        chroot "$root" "${chroot_env[@]}" apt-get update -q &&
            chroot "$root" "${chroot_env[@]}" apt-get install -y -q --no-install-recommends redis-server
    } >"$scratch/apt-redis.log" 2>&1 ||
        { tail -n 30 "$scratch/apt-redis.log" >&2; die "installing redis-server failed"; }
    [[ -x $root/usr/bin/redis-server ]] || die "redis: no redis-server binary"
    chroot "$root" getent passwd redis >/dev/null || die "redis: the package made no redis user"
    local version
    version=$(chroot "$root" /usr/bin/redis-server --version) || die "redis: redis-server --version failed"
    [[ $version == "Redis server v=7."* ]] || die "redis: unexpected version: $version"
    rm -rf "${root:?}"/var/lib/apt/lists/* "${root:?}"/var/cache/apt/* "${root:?}"/var/cache/debconf/*-old \
        "${root:?}"/var/lib/dpkg/*-old "${root:?}"/var/log/*.log "${root:?}"/var/log/apt/* \
        "${root:?}"/dev/* "$root/etc/resolv.conf" "$root/usr/sbin/policy-rc.d"
    # The working directory, as in the official image: redis's, where it would write a dump.
    mkdir -p "$root/data"
    chroot "$root" chown redis:redis /data
    # The official image's way to configure redis: a file named on the command line, the rest
    # left at redis's defaults. A file rather than `--save ""` in Cmd: umoci drops an empty
    # argument from Cmd. Debian's /etc/redis/redis.conf (loopback only, daemonized, logging to
    # a file) is not used.
    mkdir -p "$root/usr/local/etc/redis"
    cat >"$root/usr/local/etc/redis/redis.conf" <<'EOF'
# The oci2uk redis fixture: the settings the official image's build gives redis.
# Reachable through a forwarded port: no protected mode, every address.
protected-mode no
bind 0.0.0.0
# No persistence (no RDB snapshots; append-only stays off): the guest's root file system lives in
# its memory, so a dump would take memory from the data set it saves, and the fork that writes it
# doubles the pages written meanwhile; nothing outlives the VM anyway.
save ""
EOF
    chmod 0644 "$root/usr/local/etc/redis/redis.conf"
    umoci repack --image "$oci:redis" \
        --history.created_by "apt-get install --no-install-recommends redis-server; redis.conf" "$b"
    rm -rf --one-file-system "$b"
    umoci config --image "$oci:redis" --os linux --architecture "$arch" \
        --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --config.user redis --config.workingdir /data \
        --config.cmd redis-server --config.cmd /usr/local/etc/redis/redis.conf \
        --config.exposedports 6379/tcp --config.stopsignal SIGTERM \
        --config.label org.opencontainers.image.title=oci2uk-redis-fixture \
        --history.created_by 'USER redis; WORKDIR /data; CMD ["redis-server" "/usr/local/etc/redis/redis.conf"]; STOPSIGNAL SIGTERM; EXPOSE 6379'
}

# The guestcheck image: the busybox image plus one layer holding guestcheck/check.sh, which checks
# from inside a booted guest that the configuration below took effect as docker applies it:
# a relative Entrypoint found in the WorkingDir, Cmd arguments (one with a space, one a glob
# character), a User given by name with supplementary groups, Env values (with '=', empty), and
# a Volume owned by that user whose content seeds the guest's tmpfs.
build_guestcheck() {
    umoci tag --image "$oci:busybox" guestcheck
    local dir=$scratch/guestcheck
    umoci unpack --image "$oci:guestcheck" "$dir" >/dev/null
    local root=$dir/rootfs
    [[ -f $root/etc/passwd && -f $root/etc/group ]] || die "guestcheck: the busybox tree has no account files"
    # app is listed as a member of audio and staff; its primary group app lists nobody.
    printf '%s\n' 'app:x:1000:1000:guest check:/home/app:/bin/sh' >>"$root/etc/passwd"
    printf '%s\n' 'audio:x:29:app' 'staff:x:50:daemon,app' 'app:x:1000:' 'other:x:1001:daemon' \
        >>"$root/etc/group"
    mkdir -p "$root/app" "$root/home/app" "$root/data/sub"
    install -m 0755 "$guestcheck_script" "$root/app/check.sh"
    chown 1000:1000 "$root/home/app"
    chmod 0700 "$root/home/app"
    # The volume's directory: app's, 0750, with content the guest's tmpfs must be seeded with
    # (owners and modes kept, a root-only file included).
    printf 'seeded by the image\n' >"$root/data/seed.txt"
    chmod 0640 "$root/data/seed.txt"
    printf 'nested seed\n' >"$root/data/sub/nested.txt"
    chown -R 1000:1000 "$root/data"
    chmod 0750 "$root/data"
    printf 'only root reads this\n' >"$root/data/root-only"
    chmod 0600 "$root/data/root-only"
    umoci repack --image "$oci:guestcheck" --history.created_by "add the app user, /app/check.sh and /data" \
        "$dir"
    rm -rf --one-file-system "$dir"
    # --clear config.cmd: the busybox base's Cmd ["sh"] goes.
    umoci config --image "$oci:guestcheck" --clear config.cmd --config.user app --config.workingdir /app \
        --config.entrypoint ./check.sh --config.cmd all --config.cmd 'two words' --config.cmd '*' \
        --config.env 'GREETING=hello world' --config.env EQUALS=a=b=c --config.env EMPTY= \
        --config.volume /data --config.label org.opencontainers.image.title=oci2uk-guestcheck-fixture \
        --history.created_by 'USER app; WORKDIR /app; ENTRYPOINT ["./check.sh"]; CMD ["all", "two words", "*"]; VOLUME /data'
}

# complete_tar FILE: add the padding and end-of-archive blocks a truncated tar stream lacks.
complete_tar() {
    local file=$1 size
    size=$(stat -c %s "$file")
    # Already complete when block-aligned and ending in two zero blocks.
    if ((size % 512 == 0 && size >= 1024)) && [[ -z $(tail -c 1024 "$file" | tr -d '\0') ]]; then
        return
    fi
    head -c $(((512 - size % 512) % 512 + 1024)) /dev/zero >>"$file"
}

# tag_digest TAG LAYOUT: the digest of the manifest (or index) that TAG names in LAYOUT.
tag_digest() {
    jq -er --arg t "$1" \
        '[.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t)] | first | .digest' \
        "$2/index.json"
}

# add_index LAYOUT TAG: an image index of the two busybox images, written by hand with jq (the
# OCI layout is plain files) and tagged TAG.
add_index() {
    local dir=$1 tag=$2
    local entries=() t d size a
    for t in busybox busybox-arm64; do
        d=$(tag_digest "$t" "$dir")
        size=$(stat -c %s "$dir/blobs/sha256/${d#sha256:}")
        a=$(jq -r .architecture "$dir/blobs/sha256/$(jq -r .config.digest "$dir/blobs/sha256/${d#sha256:}" | cut -d: -f2)")
        entries+=("$(jq -cn --arg d "$d" --argjson s "$size" --arg a "$a" \
            '{mediaType: "application/vnd.oci.image.manifest.v1+json", digest: $d, size: $s,
              platform: {architecture: $a, os: "linux"}}')")
    done
    local index
    index=$(printf '%s\n' "${entries[@]}" | jq -cs \
        '{schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json", manifests: .}')
    local digest
    digest=sha256:$(printf '%s' "$index" | sha256sum | cut -d' ' -f1)
    printf '%s' "$index" >"$dir/blobs/sha256/${digest#sha256:}"
    jq -c --arg d "$digest" --argjson s "${#index}" --arg t "$tag" \
        '.manifests += [{mediaType: "application/vnd.oci.image.index.v1+json", digest: $d, size: $s,
                         annotations: {"org.opencontainers.image.ref.name": $t}}]' \
        "$dir/index.json" >"$dir/index.json.new"
    mv "$dir/index.json.new" "$dir/index.json"
}

# check_layers LAYOUT TAG MEDIATYPE COUNT: fail unless TAG has COUNT layers, all of MEDIATYPE.
check_layers() {
    local dir=$1 tag=$2 want=$3 count=$4 d
    d=$(tag_digest "$tag" "$dir")
    jq -e --arg m "$want" --argjson n "$count" '(.layers | length) == $n and all(.layers[]; .mediaType == $m)' \
        "$dir/blobs/sha256/${d#sha256:}" >/dev/null ||
        die "$tag: expected $count layers of $want"
}

# check_nginx LAYOUT: the flatten tests rely on the nginx layers' whiteouts and hardlinks; fail
# the build if a tool or Debian changed them. GNU tar reading every layer also proves that each
# is a complete tar stream.
check_nginx() {
    local dir=$1 m i want got
    m=$(tag_digest nginx "$dir")
    local layers
    mapfile -t layers < <(jq -r '.layers[].digest | ltrimstr("sha256:")' "$dir/blobs/sha256/${m#sha256:}")
    ((${#layers[@]} == 3)) || die "nginx: expected 3 layers"
    local whiteouts=("" "etc/.wh.cron.daily etc/.wh.motd" "var/www/html/.wh..wh..opq")
    local links=(
        "usr/bin/perl5.36.0 link to usr/bin/perl
usr/bin/uncompress link to usr/bin/gunzip"
        "usr/local/share/oci2uk/links/b link to usr/local/share/oci2uk/links/a
usr/local/share/oci2uk/more-links/c link to usr/local/share/oci2uk/links/a"
        ""
    )
    for i in 0 1 2; do
        tar -tvzf "$dir/blobs/sha256/${layers[i]}" >"$scratch/listing" || die "nginx layer $i: not a valid tar.gz"
        got=$(awk '{print $6}' "$scratch/listing" | { grep -E '(^|/)\.wh\.' || true; } | sort | xargs)
        [[ $got == "${whiteouts[i]}" ]] || die "nginx layer $i: whiteouts are '$got', expected '${whiteouts[i]}'"
        got=$({ grep '^h' "$scratch/listing" || true; } | awk '{print $6, $7, $8, $9}' | sort)
        want=${links[i]}
        [[ $got == "$want" ]] || die "nginx layer $i: hardlinks are '$got', expected '$want'"
    done
    m=$(tag_digest nginx-raw "$dir")
    for i in $(jq -r '.layers[].digest | ltrimstr("sha256:")' "$dir/blobs/sha256/${m#sha256:}"); do
        tar -tf "$dir/blobs/sha256/$i" >/dev/null || die "nginx-raw layer $i: not a valid tar"
    done
}

# check_postgres LAYOUT: fail unless the configuration is the one the postgres test relies on.
check_postgres() {
    local dir=$1 m c
    m=$(tag_digest postgres "$dir")
    c=$(jq -r .config.digest "$dir/blobs/sha256/${m#sha256:}")
    jq -e '.config | .Entrypoint == ["docker-entrypoint.sh"] and .Cmd == ["postgres"]
        and .StopSignal == "SIGINT" and (.ExposedPorts | keys) == ["5432/tcp"]
        and (.Env | index("PGDATA=/var/lib/postgresql/data") != null)' \
        "$dir/blobs/sha256/${c#sha256:}" >/dev/null || die "postgres: unexpected config"
}

# check_redis LAYOUT: fail unless the configuration is the one the redis test relies on.
check_redis() {
    local dir=$1 m c
    m=$(tag_digest redis "$dir")
    c=$(jq -r .config.digest "$dir/blobs/sha256/${m#sha256:}")
    jq -e '.config | .Entrypoint == null
        and .Cmd == ["redis-server", "/usr/local/etc/redis/redis.conf"]
        and .User == "redis" and .WorkingDir == "/data"
        and .StopSignal == "SIGTERM" and (.ExposedPorts | keys) == ["6379/tcp"]' \
        "$dir/blobs/sha256/${c#sha256:}" >/dev/null || die "redis: unexpected config"
}

# check_guestcheck LAYOUT: fail unless the configuration is the one check.sh expects (a wrong
# umoci flag would otherwise show only as failed checks in a booted guest).
check_guestcheck() {
    local dir=$1 m c
    m=$(tag_digest guestcheck "$dir")
    c=$(jq -r .config.digest "$dir/blobs/sha256/${m#sha256:}")
    jq -e '.config | .Entrypoint == ["./check.sh"] and .Cmd == ["all", "two words", "*"]
        and .User == "app" and .WorkingDir == "/app" and (.Volumes | keys) == ["/data"]
        and (.Env | index("GREETING=hello world") != null and index("EQUALS=a=b=c") != null
             and index("EMPTY=") != null)' \
        "$dir/blobs/sha256/${c#sha256:}" >/dev/null || die "guestcheck: unexpected config"
}

build() {
    [[ -f $layout/index.json ]] && return
    [[ $(id -u) -eq 0 ]] || die "building the fixtures needs root (debootstrap, chroot, device nodes)"
    mkdir -p "$cache_root"
    # Concurrent test runs wait for one build instead of each doing their own.
    exec 8>"$cache_root/.lock"
    flock 8
    [[ -f $layout/index.json ]] && return

    # Global, not local: the EXIT trap runs after build() has returned.
    work=$(mktemp -d "$cache_root/.build-$key.XXXXXX")
    # --one-file-system: nothing is ever mounted under work, and should that change, a cleanup
    # must not follow a mount into the host.
    trap 'rm -rf --one-file-system "$work"' EXIT
    scratch=$work/scratch
    mkdir -p "$scratch"
    local dir=$work/out/layout
    mkdir -p "$work/out"
    oci=$dir
    umoci init --layout "$dir"

    log "building busybox (amd64, arm64)"
    build_busybox amd64 busybox
    build_busybox arm64 busybox-arm64
    build_nginx
    log "building postgres"
    build_postgres
    log "building redis"
    build_redis
    log "building guestcheck"
    build_guestcheck
    # Drop the intermediate manifests and configs every umoci step leaves behind.
    umoci gc --layout "$dir"

    log "writing the nginx variants and the multi-platform index"
    # skopeo 1.9 does not recompress a gzip layer into zstd, and decompresses only into a `dir:`
    # image; so decompress once, then compress that with zstd or store it as it is.
    skopeo copy -q --dest-decompress "oci:$dir:nginx" "dir:$scratch/nginx-raw"
    skopeo copy -q --dest-compress-format zstd "dir:$scratch/nginx-raw" "oci:$dir:nginx-zstd"
    skopeo copy -q --dest-oci-accept-uncompressed-layers "dir:$scratch/nginx-raw" "oci:$dir:nginx-raw"
    # No nginx-docker tag: skopeo writes a Docker schema 2 manifest into an OCI layout but then
    # refuses to read it back ("no descriptor found"), so that variant exists in the registry only.
    add_index "$dir" multi

    check_layers "$dir" busybox application/vnd.oci.image.layer.v1.tar+gzip 1
    check_layers "$dir" busybox-arm64 application/vnd.oci.image.layer.v1.tar+gzip 1
    check_layers "$dir" nginx application/vnd.oci.image.layer.v1.tar+gzip 3
    check_layers "$dir" nginx-zstd application/vnd.oci.image.layer.v1.tar+zstd 3
    check_layers "$dir" nginx-raw application/vnd.oci.image.layer.v1.tar 3
    check_layers "$dir" guestcheck application/vnd.oci.image.layer.v1.tar+gzip 2
    check_layers "$dir" postgres application/vnd.oci.image.layer.v1.tar+gzip 2
    check_layers "$dir" redis application/vnd.oci.image.layer.v1.tar+gzip 2
    check_guestcheck "$dir"
    check_postgres "$dir"
    check_redis "$dir"
    check_nginx "$dir"

    rm -rf --one-file-system "$scratch"
    # Publish atomically: readers see either no layout or a complete one. mv -T renames the
    # directory itself (and fails rather than nesting it, should one appear meanwhile).
    mv -T "$work/out" "$final"
    rm -rf --one-file-system "$work"
    log "cached $layout"
}

# --- pushing --------------------------------------------------------------------------------

# push SRC DEST [skopeo options]: copy a layout tag to a registry. Every variant already exists in
# the layout, so pushing is a plain copy of blobs that are usually there already, cheap enough to
# repeat on every run; --preserve-digests (where the format is not converted) makes skopeo fail
# rather than silently recompress, so the registry holds exactly the layout's bytes.
push() {
    local src=$1 dest=$2
    shift 2
    skopeo copy -q --retry-times 2 "$@" "oci:$layout:$src" "docker://$dest" >&2
}

# check_pushed REF JQ [skopeo options]: fail unless the manifest REF names satisfies the jq
# filter JQ.
check_pushed() {
    local ref=$1 filter=$2
    shift 2
    skopeo inspect --raw "$@" "docker://$ref" | jq -e "$filter" >/dev/null ||
        die "$ref: the pushed manifest fails the check $filter"
}

push_all() {
    : "${OCI2UK_TEST_REGISTRY:?set by up.sh; source STATE_DIR/env first}"
    : "${OCI2UK_TEST_REGISTRY_HTPASSWD:?}" "${OCI2UK_TEST_REGISTRY_TOKEN:?}"
    : "${OCI2UK_TEST_REGISTRY_TLS:?}" "${OCI2UK_TEST_CREDS:?}" "${OCI2UK_TEST_CERT_DIR:?}"
    local plain=$OCI2UK_TEST_REGISTRY http=(--dest-tls-verify=false)
    # Layer media types, as each variant must have them.
    local gzip='all(.layers[]; .mediaType == "application/vnd.oci.image.layer.v1.tar+gzip")'
    local zstd='all(.layers[]; .mediaType == "application/vnd.oci.image.layer.v1.tar+zstd")'
    local raw='all(.layers[]; .mediaType == "application/vnd.oci.image.layer.v1.tar")'
    local docker='.mediaType == "application/vnd.docker.distribution.manifest.v2+json"
        and all(.layers[]; .mediaType == "application/vnd.docker.image.rootfs.diff.tar.gzip")'
    local index='.mediaType == "application/vnd.oci.image.index.v1+json"
        and ([.manifests[].platform.architecture] | sort) == ["amd64", "arm64"]'

    push busybox "$plain/busybox:latest" "${http[@]}" --preserve-digests
    push busybox-arm64 "$plain/busybox:arm64" "${http[@]}" --preserve-digests
    push multi "$plain/multi:latest" "${http[@]}" --preserve-digests --all
    push nginx "$plain/nginx:latest" "${http[@]}" --preserve-digests
    push nginx-zstd "$plain/nginx:zstd" "${http[@]}" --preserve-digests
    push nginx-raw "$plain/nginx:raw" "${http[@]}" --preserve-digests
    push guestcheck "$plain/guestcheck:latest" "${http[@]}" --preserve-digests
    # Docker schema 2 has no zstd or uncompressed-OCI media types; from the gzip image skopeo
    # rewrites only the manifest, the blobs stay the same. After nginx:latest on purpose: skopeo's
    # blob cache knows the zstd blobs as equivalents of the gzip ones and, were the gzip blobs
    # missing from the repository, would put a zstd layer into a schema 2 manifest and fail.
    push nginx "$plain/nginx:docker" "${http[@]}" --format v2s2
    push busybox "$OCI2UK_TEST_REGISTRY_HTPASSWD/busybox:latest" "${http[@]}" --preserve-digests \
        --dest-creds "$OCI2UK_TEST_CREDS"
    push busybox "$OCI2UK_TEST_REGISTRY_TOKEN/busybox:latest" "${http[@]}" --preserve-digests \
        --dest-creds "$OCI2UK_TEST_CREDS"
    push busybox "$OCI2UK_TEST_REGISTRY_TLS/busybox:latest" --dest-cert-dir "$OCI2UK_TEST_CERT_DIR" \
        --preserve-digests

    local insecure=(--tls-verify=false)
    check_pushed "$plain/busybox:latest" "$gzip" "${insecure[@]}"
    check_pushed "$plain/busybox:arm64" "$gzip" "${insecure[@]}"
    check_pushed "$plain/multi:latest" "$index" "${insecure[@]}"
    check_pushed "$plain/nginx:latest" "$gzip" "${insecure[@]}"
    check_pushed "$plain/nginx:zstd" "$zstd" "${insecure[@]}"
    check_pushed "$plain/nginx:raw" "$raw" "${insecure[@]}"
    check_pushed "$plain/guestcheck:latest" "$gzip" "${insecure[@]}"
    check_pushed "$plain/nginx:docker" "$docker" "${insecure[@]}"
    check_pushed "$OCI2UK_TEST_REGISTRY_HTPASSWD/busybox:latest" "$gzip" "${insecure[@]}" \
        --creds "$OCI2UK_TEST_CREDS"
    check_pushed "$OCI2UK_TEST_REGISTRY_TOKEN/busybox:latest" "$gzip" "${insecure[@]}" \
        --creds "$OCI2UK_TEST_CREDS"
    check_pushed "$OCI2UK_TEST_REGISTRY_TLS/busybox:latest" "$gzip" --cert-dir "$OCI2UK_TEST_CERT_DIR"
}

case ${1:-} in
    path) echo "$layout" ;;
    build) build; echo "$layout" ;;
    push) build; push_all ;;
    *) echo "usage: $0 path|build|push" >&2; exit 2 ;;
esac

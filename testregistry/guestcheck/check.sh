#!/bin/sh
# The guestcheck fixture's entrypoint: checks from inside a booted oci2uk guest that the image's
# configuration took effect as docker would apply it. fixtures.sh builds the image:
#
#   Entrypoint ["./check.sh"]  (relative: found in the WorkingDir)   Cmd ["all", "two words", "*"]
#   WorkingDir /app   User app (uid 1000, gid 1000, also in groups audio 29 and staff 50)
#   Env GREETING="hello world" EQUALS=a=b=c EMPTY= PATH=...   Volume /data (app:app 0750, seeded)
#
# Modes, by the first argument:
#   all ARGS...        every check; ARGS must be the image's Cmd. With EXTRA set (oci2uk run
#                      -e EXTRA=1) it must be 1 and must be in the environment.
#   override ARGS...   started through an oci2uk.config override of env and cmdline:
#                      `sh check.sh override "a b"` with X=y and GREETING removed
#   exit N             print a line and exit with N
#
# One line per check, `CHECK NAME ok` or `CHECK NAME FAIL got [...] want [...]`, then
# `CHECK done N failed`; the status is 0 when every check passed, else 1.

# busybox ash: HOSTNAME is the environment's, and `ulimit -n` exists.
# shellcheck disable=SC3028,SC3045

failed=0

# check NAME GOT WANT
check() {
    if [ "$2" = "$3" ]; then
        echo "CHECK $1 ok"
    else
        echo "CHECK $1 FAIL got [$2] want [$3]"
        failed=$((failed + 1))
    fi
}

# The environment exactly as the init passed it to this process (the shell adds PWD, SHLVL).
env_names() {
    tr '\0' '\n' </proc/$$/environ | cut -d= -f1 | sort | xargs
}

# The numbers in a list, sorted and without repeats, on one line.
numbers() {
    printf '%s\n' "$*" | tr -s ' \t' '\n' | grep . | sort -n -u | xargs
}

identity() {
    check uid "$(id -u)" 1000
    check gid "$(id -g)" 1000
    check user-name "$(id -un)" app
    # Supplementary groups: the primary group and the groups listing app in /etc/group.
    check groups "$(numbers "$(id -G)")" "29 50 1000"
    check proc-groups "$(numbers "$(sed -n 's/^Groups://p' /proc/self/status)")" "29 50 1000"
    check workdir "$(pwd -P)" /app
}

mode=$1
case $mode in
exit)
    echo "guestcheck: exiting with status $2 as asked"
    exit "$2"
    ;;
override)
    check argv0 "$0" check.sh
    check argc "$#" 2
    check args "$1|$2" "override|a b"
    check env-added "${X-unset}" y
    check env-removed "${GREETING-unset}" unset
    check env-kept "$EQUALS" a=b=c
    identity
    ;;
all)
    check argv0 "$0" ./check.sh
    check argc "$#" 3
    check args "$1|$2|$3" "all|two words|*"
    identity

    check env-greeting "${GREETING-unset}" "hello world"
    check env-equals "${EQUALS-unset}" a=b=c
    check env-empty "${EMPTY-unset}" ""
    check env-path "$PATH" /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    check env-home "${HOME-unset}" /home/app
    check env-hostname "${HOSTNAME-unset}" guestcheck
    extra=
    if [ -n "${EXTRA+set}" ]; then
        check env-extra "$EXTRA" 1
        extra=EXTRA
    fi
    # Nothing from the kernel's command line or the init leaks in.
    check env-exact "$(env_names)" "$(echo EMPTY EQUALS $extra GREETING HOME HOSTNAME PATH | tr ' ' '\n' | sort | xargs)"

    check volume-fs "$(awk '$2 == "/data" { print $3 }' /proc/mounts)" tmpfs
    check volume-owner "$(stat -c '%u:%g %a' /data)" "1000:1000 750"
    check volume-seed "$(cat /data/seed.txt 2>&1)" "seeded by the image"
    check volume-seed-owner "$(stat -c '%u:%g %a' /data/seed.txt)" "1000:1000 640"
    check volume-seed-nested "$(cat /data/sub/nested.txt 2>&1)" "nested seed"
    check volume-seed-root-file "$(stat -c '%u:%g %a' /data/root-only 2>&1)" "0:0 600"
    check volume-writable "$( (echo written >/data/new.txt && cat /data/new.txt) 2>&1)" written

    check tmp-fs "$(awk '$2 == "/tmp" { print $3 }' /proc/mounts)" tmpfs
    check tmp-mode "$(stat -c %a /tmp)" 1777
    check tmp-writable "$( (echo written >/tmp/guestcheck.$$ && cat /tmp/guestcheck.$$) 2>&1)" written

    check hostname "$(hostname)" guestcheck
    check etc-hostname "$(cat /etc/hostname 2>&1)" guestcheck
    check etc-hosts "$(grep -c -w guestcheck /etc/hosts)" 1
    check net-addr "$(ip -4 -o addr show dev eth0 2>&1 | awk '{ print $4 }')" 10.0.2.15/24
    check resolv "$(grep -c '^nameserver 10\.0\.2\.3' /etc/resolv.conf)" 1

    check umask "$(umask)" 0022
    check nofile "$(ulimit -n)" 1048576
    check not-pid1 "$([ $$ -ne 1 ] && echo yes)" yes
    ;;
*)
    check mode "$mode" "all, override or exit"
    ;;
esac
echo "CHECK done $failed failed"
[ "$failed" -eq 0 ]

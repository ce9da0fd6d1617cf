#!/usr/bin/env bash
# Stops the registries and the token service that up.sh started for STATE_DIR.
#
#   down.sh [STATE_DIR]    default ${OCI2UK_TESTREG_DIR:-/tmp/oci2uk-testreg}
#
# Storage, credentials and certificates stay in STATE_DIR, so the next up.sh starts quickly with
# the fixtures already in place; delete STATE_DIR for a clean slate.
set -Eeuo pipefail
trap 'printf "down.sh: error: line %s: %s failed\n" "$LINENO" "$BASH_COMMAND" >&2' ERR

state=${1:-${OCI2UK_TESTREG_DIR:-/tmp/oci2uk-testreg}}
if [[ ! -d $state ]]; then
    exit 0
fi
state=$(cd "$state" && pwd)

pids=()
# collect PIDFILE MARKER: add the pid in PIDFILE if its command line names MARKER (a path in this
# state directory): after a reboot the pid may belong to something else entirely.
collect() {
    local pid
    [[ -f $1 ]] || return 0
    pid=$(<"$1")
    if [[ -r /proc/$pid/cmdline && $(tr '\0' ' ' <"/proc/$pid/cmdline") == *"$2"* ]]; then
        pids+=("$pid")
    fi
}
for name in plain htpasswd token tls; do
    collect "$state/$name/registry.pid" "$state/$name/config.yml"
done
collect "$state/tokenserver/tokenserver.pid" "$state/tokensigner"

# All at once: the registry takes about two seconds to shut down after SIGTERM.
if ((${#pids[@]} > 0)); then
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        alive=()
        for pid in "${pids[@]}"; do
            if kill -0 "$pid" 2>/dev/null; then alive+=("$pid"); fi
        done
        ((${#alive[@]} == 0)) && break
        sleep 0.1
    done
    if ((${#alive[@]} > 0)); then
        kill -KILL "${alive[@]}" 2>/dev/null || true
    fi
    printf 'down.sh: stopped pids %s\n' "${pids[*]}" >&2
fi
rm -f "$state"/{plain,htpasswd,token,tls}/registry.pid "$state/tokenserver/tokenserver.pid"
# The env file would point tests at registries that are gone.
rm -f "$state/env"

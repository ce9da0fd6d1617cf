#!/usr/bin/env bash
# Starts the test registries on loopback, pushes the fixture images into them and writes
# STATE_DIR/env, a file of `export VAR=value` lines for the tests.
#
#   up.sh [STATE_DIR]      default ${OCI2UK_TESTREG_DIR:-/tmp/oci2uk-testreg}
#
# Four instances of Debian's docker-registry (CNCF distribution 2.8), one per way a client has
# to talk to a registry:
#   plain     http://127.0.0.1:5000   no auth
#   htpasswd  http://127.0.0.1:5001   basic auth (bcrypt htpasswd)
#   token     http://127.0.0.1:5002   bearer tokens from tokenserver.py on 127.0.0.1:5004
#   tls       https://127.0.0.1:5003  no auth, certificate from a CA made here (STATE_DIR/ca.crt)
# Ports come from OCI2UK_TESTREG_PORT_{PLAIN,HTPASSWD,TOKEN,TLS,TOKENSERVER}.
#
# Idempotent: registries of this STATE_DIR that are already up are left alone; the fixtures are
# pushed again every time (a cheap no-op when the registry has them). Storage, credentials and
# certificates persist in STATE_DIR across down.sh and up.sh.
set -Eeuo pipefail
trap 'printf "up.sh: error: line %s: %s failed\n" "$LINENO" "$BASH_COMMAND" >&2' ERR

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
state=${1:-${OCI2UK_TESTREG_DIR:-/tmp/oci2uk-testreg}}
mkdir -p "$state"
state=$(cd "$state" && pwd)

port_plain=${OCI2UK_TESTREG_PORT_PLAIN:-5000}
port_htpasswd=${OCI2UK_TESTREG_PORT_HTPASSWD:-5001}
port_token=${OCI2UK_TESTREG_PORT_TOKEN:-5002}
port_tls=${OCI2UK_TESTREG_PORT_TLS:-5003}
port_tokenserver=${OCI2UK_TESTREG_PORT_TOKENSERVER:-5004}

user=oci2uk
# Values the registry and the token service must agree on.
token_service=oci2uk-testregistry
token_issuer=oci2uk-tokenserver

log() { printf 'up.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

"$here/install.sh"

# Two test runs starting at once would otherwise both start registries on the same ports.
exec 9>"$state/lock"
flock 9

# --- secrets, made once per state directory ---------------------------------------------------

# Each is made in a temporary directory and renamed into place, so an interrupted run never
# leaves half a CA behind for the next one to trust.

if [[ ! -d $state/auth ]]; then
    tmp=$(mktemp -d "$state/.auth.XXXXXX")
    (umask 077 && openssl rand -hex 16 >"$tmp/password")
    # -i reads the password from stdin, keeping it off the command line; -B is bcrypt, the only
    # hash distribution's htpasswd support accepts.
    htpasswd -B -i -c "$tmp/htpasswd" "$user" <"$tmp/password" 2>/dev/null
    mv -T "$tmp" "$state/auth"
fi
password=$(<"$state/auth/password")

if [[ ! -d $state/ca ]]; then
    tmp=$(mktemp -d "$state/.ca.XXXXXX")
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
        -subj "/CN=oci2uk test CA" \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
        -keyout "$tmp/ca.key" -out "$tmp/ca.crt" 2>/dev/null
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -subj "/CN=127.0.0.1" -keyout "$tmp/server.key" -out "$tmp/server.csr" 2>/dev/null
    # A leaf that strict verifiers (rustls/webpki) accept: SANs for both names a test may use,
    # not a CA, serverAuth only.
    printf '%s\n' 'subjectAltName=IP:127.0.0.1,DNS:localhost' 'basicConstraints=critical,CA:FALSE' \
        'keyUsage=critical,digitalSignature' 'extendedKeyUsage=serverAuth' >"$tmp/server.ext"
    openssl x509 -req -in "$tmp/server.csr" -CA "$tmp/ca.crt" -CAkey "$tmp/ca.key" -days 3650 \
        -set_serial "0x$(openssl rand -hex 8)" -extfile "$tmp/server.ext" -out "$tmp/server.crt" 2>/dev/null
    # skopeo's --cert-dir reads every *.crt in a directory; this one holds nothing else.
    mkdir "$tmp/certs"
    cp "$tmp/ca.crt" "$tmp/certs/ca.crt"
    mv -T "$tmp" "$state/ca"
fi
cp "$state/ca/ca.crt" "$state/ca.crt"

if [[ ! -d $state/tokensigner ]]; then
    tmp=$(mktemp -d "$state/.tokensigner.XXXXXX")
    # The registry trusts tokens whose x5c chain ends in its rootcertbundle; a self-signed
    # certificate of the signing key is the shortest such chain.
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
        -subj "/CN=oci2uk token signer" -keyout "$tmp/key.pem" -out "$tmp/cert.pem" 2>/dev/null
    mv -T "$tmp" "$state/tokensigner"
fi

if [[ ! -f $state/http-secret ]]; then
    # Signs the registry's upload state; set so the registry does not warn on every start.
    openssl rand -hex 32 >"$state/http-secret"
fi

# --- processes ---------------------------------------------------------------------------------

# is_ours PIDFILE MARKER: the pid in PIDFILE is alive and its command line contains MARKER (a
# path under STATE_DIR), so a recycled pid is never mistaken for our process.
is_ours() {
    local pid
    [[ -f $1 ]] || return 1
    pid=$(<"$1")
    [[ -r /proc/$pid/cmdline ]] || return 1
    [[ $(tr '\0' ' ' <"/proc/$pid/cmdline") == *"$2"* ]]
}

port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# spawn NAME PIDFILE LOGFILE CMD...: start CMD detached (its own session, stdin closed, output
# appended to LOGFILE), so it outlives this script and the terminal or job that ran it.
spawn() {
    local name=$1 pidfile=$2 logfile=$3
    shift 3
    (
        # Inherit no descriptor beyond stderr: above all not the lock on fd 9, which a
        # long-lived child would hold for ever, making the next up.sh wait on it; nor a pipe of
        # whoever ran us, who would wait for its end.
        for fd in /proc/self/fd/*; do
            fd=${fd##*/}
            if ((fd > 2)); then eval "exec $fd>&-"; fi
        done
        # Not a process group leader here, so setsid needs no fork and the pid stays $!.
        exec setsid "$@" </dev/null >>"$logfile" 2>&1
    ) &
    echo $! >"$pidfile"
    log "started $name (pid $!)"
}

# wait_http NAME PIDFILE URL [curl options]: wait until URL gives any HTTP answer.
wait_http() {
    local name=$1 pidfile=$2 url=$3 i code
    shift 3
    for ((i = 0; i < 150; i++)); do
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$@" "$url" || true)
        [[ $code != 000 ]] && return 0
        if ! kill -0 "$(<"$pidfile")" 2>/dev/null; then
            die "$name exited during startup; see its log"
        fi
        sleep 0.1
    done
    die "$name does not answer at $url"
}

# registry NAME PORT SCHEME AUTH_YAML TLS_YAML: configure and (unless already running) start
# one registry in STATE_DIR/NAME.
registry() {
    local name=$1 port=$2 scheme=$3 auth=$4 tls=$5
    local dir=$state/$name
    mkdir -p "$dir/storage"
    local config=$dir/config.yml
    if is_ours "$dir/registry.pid" "$config"; then
        return
    fi
    port_in_use "$port" && die "port $port ($name) is taken by another process; set OCI2UK_TESTREG_PORT_${name^^}"
    # Info level logs every request with its method and URI ("response completed"), which is
    # what tests grep for upload sessions and blob mounts.
    cat >"$config" <<EOF
version: 0.1
log:
  level: info
  formatter: text
  fields:
    instance: $name
storage:
  filesystem:
    rootdirectory: $dir/storage
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:$port
  secret: $(<"$state/http-secret")
  headers:
    X-Content-Type-Options: [nosniff]
$tls
health:
  storagedriver:
    enabled: false
$auth
EOF
    spawn "registry $name on $scheme://127.0.0.1:$port" "$dir/registry.pid" "$dir/registry.log" \
        /usr/bin/docker-registry serve "$config"
}

registry plain "$port_plain" http "" ""
registry htpasswd "$port_htpasswd" http "auth:
  htpasswd:
    realm: oci2uk-testregistry
    path: $state/auth/htpasswd" ""
registry token "$port_token" http "auth:
  token:
    realm: http://127.0.0.1:$port_tokenserver/token
    service: $token_service
    issuer: $token_issuer
    rootcertbundle: $state/tokensigner/cert.pem" ""
registry tls "$port_tls" https "" "  tls:
    certificate: $state/ca/server.crt
    key: $state/ca/server.key"

tokenserver_dir=$state/tokenserver
mkdir -p "$tokenserver_dir"
if ! is_ours "$tokenserver_dir/tokenserver.pid" "$state/tokensigner"; then
    port_in_use "$port_tokenserver" &&
        die "port $port_tokenserver (token service) is taken by another process; set OCI2UK_TESTREG_PORT_TOKENSERVER"
    # /usr/bin/python3 explicitly: python3-cryptography is Debian's, and a python3 earlier in
    # PATH (pyenv, a virtualenv) would not see it. -u: the log is written as requests come.
    spawn "token service on http://127.0.0.1:$port_tokenserver" "$tokenserver_dir/tokenserver.pid" \
        "$tokenserver_dir/tokenserver.log" \
        /usr/bin/python3 -u "$here/tokenserver.py" --listen "127.0.0.1:$port_tokenserver" \
        --key "$state/tokensigner/key.pem" --cert "$state/tokensigner/cert.pem" \
        --issuer "$token_issuer" --service "$token_service" \
        --user "$user" --password-file "$state/auth/password"
fi

wait_http "plain registry" "$state/plain/registry.pid" "http://127.0.0.1:$port_plain/v2/"
wait_http "htpasswd registry" "$state/htpasswd/registry.pid" "http://127.0.0.1:$port_htpasswd/v2/"
wait_http "token registry" "$state/token/registry.pid" "http://127.0.0.1:$port_token/v2/"
wait_http "tls registry" "$state/tls/registry.pid" "https://127.0.0.1:$port_tls/v2/" \
    --cacert "$state/ca.crt"
wait_http "token service" "$tokenserver_dir/tokenserver.pid" "http://127.0.0.1:$port_tokenserver/token"

# A docker-style auth file with the credentials of both authenticating registries, for tests of
# --authfile and ~/.docker/config.json.
auth_b64=$(printf '%s:%s' "$user" "$password" | base64 -w0)
jq -n --arg a "$auth_b64" --arg h "127.0.0.1:$port_htpasswd" --arg t "127.0.0.1:$port_token" \
    '{auths: {($h): {auth: $a}, ($t): {auth: $a}}}' >"$state/auth/config.json"

# --- fixtures and the env file -----------------------------------------------------------------

vars=(
    OCI2UK_TEST_STATE="$state"
    OCI2UK_TEST_REGISTRY="127.0.0.1:$port_plain"
    OCI2UK_TEST_REGISTRY_HTPASSWD="127.0.0.1:$port_htpasswd"
    OCI2UK_TEST_REGISTRY_TOKEN="127.0.0.1:$port_token"
    OCI2UK_TEST_REGISTRY_TLS="127.0.0.1:$port_tls"
    OCI2UK_TEST_TOKEN_REALM="http://127.0.0.1:$port_tokenserver/token"
    OCI2UK_TEST_TOKEN_SERVICE="$token_service"
    OCI2UK_TEST_CA="$state/ca.crt"
    OCI2UK_TEST_CERT_DIR="$state/ca/certs"
    OCI2UK_TEST_CREDS="$user:$password"
    OCI2UK_TEST_USER="$user"
    OCI2UK_TEST_PASSWORD="$password"
    OCI2UK_TEST_AUTHFILE="$state/auth/config.json"
    OCI2UK_TEST_LAYOUT="$("$here/fixtures.sh" path)"
    OCI2UK_TEST_REGISTRY_LOG="$state/plain/registry.log"
    OCI2UK_TEST_REGISTRY_HTPASSWD_LOG="$state/htpasswd/registry.log"
    OCI2UK_TEST_REGISTRY_TOKEN_LOG="$state/token/registry.log"
    OCI2UK_TEST_REGISTRY_TLS_LOG="$state/tls/registry.log"
    OCI2UK_TEST_TOKEN_SERVER_LOG="$tokenserver_dir/tokenserver.log"
)

# fixtures.sh push finds the registries in these same variables.
export "${vars[@]}"
"$here/fixtures.sh" push

# Written last and renamed into place: a test that finds the file finds the fixtures pushed.
{
    printf '# Written by testregistry/up.sh; source it: . %s\n' "$state/env"
    for v in "${vars[@]}"; do
        printf 'export %s=%q\n' "${v%%=*}" "${v#*=}"
    done
} >"$state/env.new"
mv "$state/env.new" "$state/env"
log "ready; . $state/env"

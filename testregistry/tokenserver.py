#!/usr/bin/python3
"""A minimal token service for the test registry's `auth: token` mode.

It speaks the protocol of the Docker registry token specification
(https://distribution.github.io/distribution/spec/auth/token/): the registry answers an
unauthenticated request with `WWW-Authenticate: Bearer realm=...,service=...,scope=...`, the client
asks this service for a token (GET with optional basic auth, or the OAuth2 POST form), and
presents the token to the registry.

Tokens are JWTs signed with ES256. The signing certificate travels in the `x5c` header: the
distribution registry verifies that chain against its `rootcertbundle`, which holds the same
self-signed certificate, so no key id has to be agreed on.

Policy, chosen so that tests can tell the cases apart:
  * the one configured user with the right password gets every action it asks for;
  * a request without credentials gets a token that grants nothing, so an anonymous pull is
    refused by the registry (401, insufficient_scope) rather than by this service;
  * wrong credentials get 401 here, as real token services do.

Only the Python standard library and python3-cryptography (a Debian package) are used, so it runs
with /usr/bin/python3 on a fresh Debian machine.
"""

import argparse
import base64
import binascii
import hmac
import json
import secrets
import sys
import threading
import time
import urllib.parse
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

KNOWN_ACTIONS = {"pull", "push", "delete", "*"}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class BadRequest(Exception):
    pass


def parse_scope(scope: str) -> dict:
    # `type:name:actions`; a repository name may hold a registry host with a port
    # (`repository:localhost:5000/x:pull` does not occur in practice, but splitting on the first
    # and last colon handles it), so the name is everything between them.
    first = scope.find(":")
    last = scope.rfind(":")
    if first <= 0 or last == first:
        raise BadRequest(f"malformed scope {scope!r}")
    actions = [a for a in scope[last + 1 :].split(",") if a]
    return {"type": scope[:first], "name": scope[first + 1 : last], "actions": actions}


class Issuer:
    def __init__(self, args):
        with open(args.key, "rb") as f:
            self.key = serialization.load_pem_private_key(f.read(), password=None)
        if not isinstance(self.key, ec.EllipticCurvePrivateKey) or self.key.curve.name != "secp256r1":
            sys.exit("tokenserver: the signing key must be an EC P-256 key (ES256)")
        with open(args.cert, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        self.x5c = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode("ascii")]
        self.issuer = args.issuer
        self.service = args.service
        self.user = args.user
        with open(args.password_file, "r", encoding="utf-8") as f:
            self.password = f.read().strip()
        self.ttl = args.ttl
        # Refresh tokens handed out on the OAuth2 password grant; kept in memory, which is enough
        # for a service that lives as long as the test registry.
        self.refresh_tokens = {}
        self.lock = threading.Lock()

    def check_password(self, user: str, password: str) -> bool:
        ok_user = hmac.compare_digest(user.encode(), self.user.encode())
        ok_pass = hmac.compare_digest(password.encode(), self.password.encode())
        return ok_user and ok_pass

    def sign(self, subject: str, service: str, access: list) -> tuple:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "ES256", "x5c": self.x5c}
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": service,
            "exp": now + self.ttl,
            # A little slack for clocks; the registry itself allows some leeway too.
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        signing_input = (
            b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        der = self.key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
        # JWS wants the raw r||s form (RFC 7518 section 3.4), not the DER that signing returns.
        r, s = decode_dss_signature(der)
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return signing_input + "." + b64url(sig), now

    def grant(self, subject, scopes):
        if subject is None:
            # Anonymous: a valid token that grants nothing.
            return []
        access = []
        for scope in scopes:
            actions = [a for a in scope["actions"] if a in KNOWN_ACTIONS]
            access.append({"type": scope["type"], "name": scope["name"], "actions": actions})
        return access


class Handler(BaseHTTPRequestHandler):
    server_version = "oci2uk-tokenserver/1"
    issuer: Issuer = None

    def log_message(self, fmt, *args):
        sys.stderr.write("%s %s\n" % (datetime.now(timezone.utc).isoformat(timespec="seconds"), fmt % args))
        sys.stderr.flush()

    def send_json(self, status, body, extra_headers=()):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in extra_headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def unauthorized(self, message):
        self.send_json(
            401,
            {"errors": [{"code": "UNAUTHORIZED", "message": message}]},
            [("WWW-Authenticate", 'Basic realm="oci2uk-tokenserver"')],
        )

    def bad_request(self, message):
        self.send_json(400, {"error": "invalid_request", "errors": [{"code": "DENIED", "message": message}]})

    def basic_auth(self):
        """Returns None for no credentials, (user, password) otherwise; raises on garbage."""
        header = self.headers.get("Authorization")
        if not header:
            return None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            raise BadRequest("only basic authentication is supported here")
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as e:
            raise BadRequest("malformed basic authentication") from e
        user, sep, password = decoded.partition(":")
        if not sep:
            raise BadRequest("malformed basic authentication")
        return user, password

    def issue(self, subject, service, scopes, refresh_token=None):
        access = self.issuer.grant(subject, scopes)
        token, now = self.issuer.sign(subject or "", service, access)
        self.log_message(
            "issued token sub=%r service=%r access=%s", subject or "<anonymous>", service, json.dumps(access)
        )
        body = {
            "token": token,
            "access_token": token,
            "expires_in": self.issuer.ttl,
            "issued_at": datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        if refresh_token:
            body["refresh_token"] = refresh_token
        self.send_json(200, body)

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path != "/token":
            self.send_json(404, {"errors": [{"code": "NOT_FOUND", "message": "try /token"}]})
            return
        query = urllib.parse.parse_qs(url.query)
        try:
            scopes = [parse_scope(s) for value in query.get("scope", []) for s in value.split(" ") if s]
            creds = self.basic_auth()
        except BadRequest as e:
            self.bad_request(str(e))
            return
        subject = None
        if creds is not None:
            if not self.issuer.check_password(*creds):
                self.log_message("refused credentials for user %r", creds[0])
                self.unauthorized("invalid username or password")
                return
            subject = creds[0]
        # The token's audience is the service the client names, so a client that sends the wrong
        # service gets a token the registry rejects, as with a real token service.
        service = query.get("service", [self.issuer.service])[0]
        self.issue(subject, service, scopes)

    def do_POST(self):
        # The OAuth2 form of the protocol: grant_type=password or grant_type=refresh_token.
        if urllib.parse.urlsplit(self.path).path != "/token":
            self.send_json(404, {"errors": [{"code": "NOT_FOUND", "message": "try /token"}]})
            return
        length = int(self.headers.get("Content-Length") or 0)
        form = urllib.parse.parse_qs(self.rfile.read(length).decode("utf-8", "replace"))

        def field(name, default=None):
            return form.get(name, [default])[0]

        try:
            scopes = [parse_scope(s) for s in (field("scope") or "").split(" ") if s]
        except BadRequest as e:
            self.bad_request(str(e))
            return
        service = field("service", self.issuer.service)
        grant_type = field("grant_type")
        if grant_type == "password":
            user, password = field("username", ""), field("password", "")
            if not self.issuer.check_password(user, password):
                self.log_message("refused credentials for user %r", user)
                self.unauthorized("invalid username or password")
                return
            refresh = None
            if field("access_type") == "offline":
                refresh = secrets.token_urlsafe(32)
                with self.issuer.lock:
                    self.issuer.refresh_tokens[refresh] = user
            self.issue(user, service, scopes, refresh)
        elif grant_type == "refresh_token":
            with self.issuer.lock:
                user = self.issuer.refresh_tokens.get(field("refresh_token", ""))
            if user is None:
                self.unauthorized("invalid refresh token")
                return
            self.issue(user, service, scopes)
        else:
            self.bad_request(f"unsupported grant_type {grant_type!r}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:5004", help="HOST:PORT to listen on")
    parser.add_argument("--key", required=True, help="PEM EC P-256 private key that signs tokens")
    parser.add_argument("--cert", required=True, help="PEM certificate of that key, sent as x5c")
    parser.add_argument("--issuer", required=True, help="the registry's auth.token.issuer")
    parser.add_argument("--service", required=True, help="the registry's auth.token.service")
    parser.add_argument("--user", required=True)
    parser.add_argument("--password-file", required=True)
    parser.add_argument("--ttl", type=int, default=300, help="token lifetime in seconds")
    args = parser.parse_args()

    Handler.issuer = Issuer(args)
    host, _, port = args.listen.rpartition(":")
    server = ThreadingHTTPServer((host, int(port)), Handler)
    sys.stderr.write(f"tokenserver: listening on http://{args.listen}/token\n")
    sys.stderr.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()

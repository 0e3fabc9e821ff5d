"""Stand-ins for what cannot run here, speaking the real wire formats: a homeserver (HTTPS, with a
certificate from a test CA) and Twilio's Messages API; and a real SMTP listener (aiosmtpd)."""

from __future__ import annotations

import base64
import json
import secrets
import ssl
import threading
import time
from email import message_from_bytes, policy
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from signedjson.key import encode_verify_key_base64, generate_signing_key, get_verify_key
from signedjson.sign import sign_json


class _Server(ThreadingHTTPServer):
    daemon_threads = True


def _answer(handler: BaseHTTPRequestHandler, status: int, body: Any) -> None:
    raw = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(raw)))
    handler.end_headers()
    handler.wfile.write(raw)


class FakeHomeserver:
    """A homeserver called `name` on 127.0.0.1: OpenID userinfo, server keys, X-Matrix signing, and
    3PID onbind callbacks (answered with `onbind_status`: set it to an error to refuse them).
    Clear `userinfo_open` to hold OpenID checks."""

    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.ca = trustme.CA()
        self.ca_file = root / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.signing_key = generate_signing_key("hs1")
        self.key_id = f"ed25519:{self.signing_key.version}"
        self.openid: dict[str, str] = {}
        self.requests: list[str] = []
        self.onbind_status = 200
        self.onbind_received: list[tuple[int, dict[str, Any]]] = []  # (status answered, body)
        # Cleared, OpenID userinfo requests wait (up to a minute) until it is set again.
        self.userinfo_open = threading.Event()
        self.userinfo_open.set()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                fake.requests.append(url.path)
                if url.path == "/_matrix/federation/v1/openid/userinfo":
                    fake.userinfo_open.wait(60)
                    token = parse_qs(url.query).get("access_token", [""])[0]
                    if token in fake.openid:
                        _answer(self, 200, {"sub": fake.openid[token]})
                    else:
                        _answer(self, 401, {"errcode": "M_UNKNOWN_TOKEN", "error": "Unknown token"})
                elif url.path == "/_matrix/key/v2/server":
                    _answer(self, 200, fake.server_keys())
                else:
                    _answer(self, 404, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"})

            def do_POST(self) -> None:
                fake.requests.append(self.path)
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if self.path != "/_matrix/federation/v1/3pid/onbind":
                    _answer(self, 404, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"})
                    return
                status = fake.onbind_status
                fake.onbind_received.append((status, body))
                _answer(self, status, {} if status == 200 else {"errcode": "M_UNKNOWN", "error": "try later"})

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ca.issue_cert(name, "127.0.0.1").configure_cert(context)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def onbinds(self, address: str, status: int = 200) -> list[dict[str, Any]]:
        """The onbind bodies received for address that were answered with status."""
        return [body for answered, body in self.onbind_received if answered == status and body["address"] == address]

    def server_keys(self) -> dict[str, Any]:
        body = {"server_name": self.name, "old_verify_keys": {},
                "valid_until_ts": int(time.time() * 1000) + 3600_000,
                "verify_keys": {self.key_id: {"key": encode_verify_key_base64(get_verify_key(self.signing_key))}}}
        return sign_json(body, self.name, self.signing_key)

    def openid_token(self, user_id: str) -> dict[str, Any]:
        """What the homeserver's /openid/request_token gives a client for user_id."""
        token = secrets.token_urlsafe(16)
        self.openid[token] = user_id
        return {"access_token": token, "token_type": "Bearer", "matrix_server_name": self.name, "expires_in": 3600}

    def x_matrix(self, uri: str, destination: str, content: Any, signing_key: Any = None,
                 origin: str | None = None) -> str:
        """The Authorization header Synapse sends to an identity server (it signs "destination_is")."""
        origin = origin or self.name
        key = signing_key or self.signing_key
        signed = sign_json({"method": "POST", "uri": uri, "origin": origin, "destination_is": destination,
                            "content": content}, origin, key)
        sig = signed["signatures"][origin][f"ed25519:{key.version}"]
        return f'X-Matrix origin="{origin}",destination="{destination}",key="ed25519:{key.version}",sig="{sig}"'


class Mailbox:
    """A real SMTP listener (aiosmtpd) keeping every message it receives; with a certificate it
    speaks STARTTLS (required) or implicit TLS, and requires a login; SMTPUTF8 only when asked."""

    def __init__(self, port: int, tls: str = "none", cert: Any = None,
                 login: tuple[str, str] | None = None, smtputf8: bool = False) -> None:
        self.messages: list[tuple[list[str], EmailMessage]] = []
        self.raw: list[bytes] = []  # each message as it came over the wire
        self.logins: list[str] = []
        mailbox = self

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                message = message_from_bytes(envelope.content, policy=policy.default)
                mailbox.raw.append(envelope.content)
                mailbox.messages.append((list(envelope.rcpt_tos), message))
                return "250 OK"

        def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
            ok = login is not None and isinstance(data, LoginPassword) and (
                data.login.decode(), data.password.decode()) == login
            if ok:
                mailbox.logins.append(data.login.decode())
            # handled=False: aiosmtpd then answers a refusal itself (535), as a real server does.
            return AuthResult(success=ok, handled=False)

        options: dict[str, Any] = {}
        if tls != "none":
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            cert.configure_cert(context)
            options = {"auth_required": True, "authenticator": authenticate}
            if tls == "starttls":
                options.update(tls_context=context, require_starttls=True)
            else:
                # aiosmtpd counts only STARTTLS as TLS for AUTH; this connection is TLS from the start.
                options.update(ssl_context=context, auth_require_tls=False)
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=port, server_hostname="localhost",
                                     enable_SMTPUTF8=smtputf8, **options)
        self.controller.start()
        self.port = port

    def close(self) -> None:
        self.controller.stop()

    def to(self, address: str) -> list[EmailMessage]:
        return [m for rcpt, m in self.messages if address in rcpt]


class FakeTwilio:
    """Twilio's POST /2010-04-01/Accounts/{sid}/Messages.json and GET /2010-04-01/Accounts/{sid}.json
    over plain HTTP on 127.0.0.1."""

    def __init__(self, account_sid: str, auth_token: str) -> None:
        self.sent: list[dict[str, str]] = []
        self.fail = False  # refuse the To number (Twilio's 400, error 21211)
        self.down = False  # fail on Twilio's side (500, error 20500)
        fake = self
        expected_auth = "Basic " + base64.b64encode(f"{account_sid}:{auth_token}".encode()).decode()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path != f"/2010-04-01/Accounts/{account_sid}.json":
                    _answer(self, 404, {"code": 20404, "message": "The requested resource was not found"})
                elif self.headers.get("Authorization") != expected_auth:
                    _answer(self, 401, {"code": 20003, "message": "Authenticate"})
                else:
                    _answer(self, 200, {"sid": account_sid, "friendly_name": "Test", "status": "active"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                if self.path != f"/2010-04-01/Accounts/{account_sid}/Messages.json":
                    _answer(self, 404, {"code": 20404, "message": "The requested resource was not found"})
                elif self.headers.get("Authorization") != expected_auth:
                    _answer(self, 401, {"code": 20003, "message": "Authenticate"})
                elif fake.down:
                    _answer(self, 500, {"code": 20500, "message": "Internal Server Error"})
                elif fake.fail:
                    _answer(self, 400, {"code": 21211, "message": f"The 'To' number {form.get('To')} is not valid."})
                else:
                    fake.sent.append(form)
                    _answer(self, 201, {"sid": "SM" + secrets.token_hex(16), "status": "queued",
                                        "to": form.get("To"), "from": form.get("From"), "body": form.get("Body")})

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

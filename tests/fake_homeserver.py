"""A stand-in for Synapse's client-server API, speaking its wire format: whoami, user directory
search, login (checking passwords the way Synapse's REST password provider does, by calling
check_credentials on the identity server), profiles, registration requestToken, room invites and createRoom."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import httpx

UNKNOWN_TOKEN = {"errcode": "M_UNKNOWN_TOKEN", "error": "Invalid access token passed."}

class ClientHomeserver:
    """Serves on 127.0.0.1:<free port> until stop(); tests fill tokens, directory and profiles."""

    def __init__(self, domain: str = "example.org") -> None:
        self.domain = domain
        self.tokens: dict[str, str] = {}  # access token -> user id
        self.directory: list[dict[str, Any]] = []  # what its own user directory holds
        self.profiles: dict[str, dict[str, Any]] = {}
        self.identity_server: str | None = None  # where the password provider points
        self.requests: list[tuple[str, str, Any]] = []  # (method, path, JSON body)
        self.search_error: tuple[int, dict[str, Any]] | None = None
        # What register/{email,msisdn}/requestToken answers (status, body); None: a new sid.
        self.register_answer: tuple[int, dict[str, Any]] | None = None
        self.raw: list[tuple[str, dict[str, str], bytes]] = []  # (path, headers lower-cased, body) of every POST
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _user(self) -> str | None:
                header = self.headers.get("Authorization", "")
                if header.startswith("Bearer "):
                    return fake.tokens.get(header.removeprefix("Bearer "))
                query = parse_qs(urlsplit(self.path).query).get("access_token")
                return fake.tokens.get(query[0]) if query else None

            def do_GET(self) -> None:
                fake.requests.append(("GET", self.path, None))
                if self.path == "/_matrix/client/versions":
                    return self._answer(200, {"versions": ["r0.6.1", "v1.1", "v1.11"], "unstable_features": {}})
                if self.path == "/_matrix/client/v3/account/whoami":
                    user = self._user()
                    if user is None:
                        return self._answer(401, UNKNOWN_TOKEN)
                    return self._answer(200, {"user_id": user, "is_guest": False, "device_id": "DEVICE"})
                if self.path.endswith("/login"):
                    return self._answer(200, {"flows": [{"type": "m.login.password"}]})
                if "/profile/" in self.path:
                    user_id = unquote(self.path.rsplit("/", 1)[1])
                    if user_id not in fake.profiles:
                        return self._answer(404, {"errcode": "M_NOT_FOUND", "error": "Profile was not found"})
                    return self._answer(200, fake.profiles[user_id])
                self._answer(404, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"})

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                fake.raw.append((self.path, {k.lower(): v for k, v in self.headers.items()}, raw))
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    return self._answer(400, {"errcode": "M_NOT_JSON", "error": "Content not JSON."})
                fake.requests.append(("POST", self.path, body))
                if "/register/" in self.path and self.path.endswith("/requestToken"):
                    if fake.register_answer is not None:
                        return self._answer(*fake.register_answer)
                    return self._answer(200, {"sid": f"hs-sid-{len(fake.raw)}"})
                if self.path.split("?")[0].endswith("/createRoom"):
                    if self._user() is None:
                        return self._answer(401, UNKNOWN_TOKEN)
                    return self._answer(200, {"room_id": f"!new{len(fake.raw)}:{fake.domain}"})
                if "/rooms/" in self.path and self.path.split("?")[0].endswith("/invite"):
                    if self._user() is None:
                        return self._answer(401, UNKNOWN_TOKEN)
                    return self._answer(200, {})
                if self.path.endswith("/user_directory/search"):
                    if self._user() is None:
                        return self._answer(401, UNKNOWN_TOKEN)
                    if fake.search_error is not None:
                        return self._answer(*fake.search_error)
                    term, limit = body["search_term"].lower(), body.get("limit", 10)
                    found = [r for r in fake.directory
                             if term in r["user_id"].lower() or term in (r.get("display_name") or "").lower()]
                    return self._answer(200, {"results": found[:limit], "limited": len(found) > limit})
                if self.path.endswith("/login"):
                    try:
                        return self._login(body)
                    except (AttributeError, KeyError, TypeError):  # a body of the wrong shape, as Synapse
                        return self._answer(400, {"errcode": "M_BAD_JSON", "error": "Invalid login submission"})
                self._answer(404, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"})

            def _login(self, body: dict[str, Any]) -> None:
                identifier = body.get("identifier", {})
                if identifier.get("type") != "m.id.user":
                    # Synapse looks 3PIDs up in its own table, where these users have none.
                    return self._answer(403, {"errcode": "M_FORBIDDEN", "error": "Invalid username or password"})
                user = identifier["user"]
                user_id = user if user.startswith("@") else f"@{user}:{fake.domain}"
                answer = httpx.post(f"{fake.identity_server}/_matrix-internal/identity/v1/check_credentials",
                                    json={"user": {"id": user_id, "password": body.get("password", "")}}, timeout=30)
                answer.raise_for_status()  # what the provider does: anything but 200 fails the login
                if not answer.json()["auth"]["success"]:
                    return self._answer(403, {"errcode": "M_FORBIDDEN", "error": "Invalid username or password"})
                self._answer(200, {"user_id": user_id, "access_token": "syt_new", "device_id": "NEWDEVICE",
                                   "home_server": fake.domain})

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.http.shutdown()
        self.http.server_close()

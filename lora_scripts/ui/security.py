"""Who may talk to the UI, and which folders it may read and write.

- The UI binds to 127.0.0.1. Another address needs `--token`; once a token is set, every request
  must carry it (header `Authorization: Bearer …` or `X-LoRA-Token`, query `?token=`, or the
  cookie the first tokened page load sets, so <img> and download links work).
- Without a token, only loopback Host headers are served (a web page cannot reach the UI through
  DNS rebinding), and a write from a page of another origin is refused (CSRF).
- Every path the API is given must lie inside the allowed roots (the working directory and the
  state dir unless `--allow-root` adds more).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lora_scripts.errors import UserError

TOKEN_COOKIE = "lora_ui_token"
TOKEN_HEADER = "x-lora-token"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an IP address) is this machine only."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token. Raises UserError."""
    if not is_loopback(host) and not token:
        raise UserError(f"--host {host} lets other machines reach the UI; also pass --token SECRET "
                        "(every request must then carry it), or keep the default --host 127.0.0.1")


class PathGuard:
    """The folders the API may read and write: paths elsewhere are refused before anything is written."""

    def __init__(self, roots: list[Path], cwd: Path) -> None:
        self.cwd = cwd.resolve()
        self.roots = list(dict.fromkeys(root.resolve() for root in roots))

    def check(self, path: Path | str, what: str) -> Path:
        """`path` (relative to the working directory) resolved, if inside a root; else UserError."""
        resolved = Path(os.path.abspath(self.cwd / Path(path).expanduser())).resolve()
        if any(resolved.is_relative_to(root) for root in self.roots):
            return resolved
        roots = ", ".join(str(root) for root in self.roots)
        raise UserError(f"{what} {path} is outside the folders this UI may use ({roots}); "
                        f"use a path inside them, or restart the UI with --allow-root {resolved.parent}")


def _presented_token(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get(TOKEN_HEADER) or request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE)


def _host_name(host_header: str) -> str:
    return urlsplit(f"//{host_header}").hostname or ""


def access_middleware(token: str | None) -> Callable[[Request, Callable[[Request], Awaitable[Response]]], Awaitable[Response]]:
    """An HTTP middleware enforcing the rules of the module docstring."""

    async def middleware(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        host = request.headers.get("host", "")
        if token:
            presented = _presented_token(request)
            if presented is None or not hmac.compare_digest(presented.encode(), token.encode()):
                return JSONResponse({"error": "this UI needs its token: open it with ?token=… or send the X-LoRA-Token header"}, 401)
        elif not is_loopback(_host_name(host)):
            return JSONResponse({"error": f"Host {host!r} refused: without --token the UI only answers to localhost"}, 403)
        origin = request.headers.get("origin")
        if request.method not in ("GET", "HEAD") and origin and urlsplit(origin).netloc != host:
            return JSONResponse({"error": f"request from another site ({origin}) refused"}, 403)
        response = await call_next(request)
        if token and request.query_params.get("token") == token:
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response

    return middleware

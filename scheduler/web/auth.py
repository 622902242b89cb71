"""Who may do what over HTTP (SPEC §13): pure rules, no framework.

Two roles: `admin` (ADMIN_TOKEN) may do everything, `read` (READ_TOKEN) only read. A client sends
`Authorization: Bearer <token>`; a browser trades a token for a session cookie once. Tokens are
compared as SHA-256 digests in constant time, so neither a token's value nor its length shows
in how long a refusal takes. A session cookie is `<role>.<expiry>.<signature>`, signed with a key
derived from that role's token: changing a token ends its sessions.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

ADMIN = "admin"
READ = "read"
SESSION_COOKIE = "stuck_runs_session"
SESSION_SECONDS = 12 * 3600


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()


@dataclass(frozen=True)
class Tokens:
    admin: str | None = field(default=None, repr=False)
    read: str | None = field(default=None, repr=False)

    @property
    def configured(self) -> bool:
        return bool(self.admin or self.read)

    def role_of(self, presented: str | None) -> str | None:
        """The role a presented token grants, or None. Both tokens are always compared."""
        given = _digest(presented or "")
        is_admin = hmac.compare_digest(given, _digest(self.admin)) if self.admin else False
        is_read = hmac.compare_digest(given, _digest(self.read)) if self.read else False
        if presented and is_admin:
            return ADMIN
        if presented and is_read:
            return READ
        return None

    def _key(self, role: str) -> bytes | None:
        token = self.admin if role == ADMIN else self.read if role == READ else None
        return hmac.new(_digest(token), b"stuck-runs session", hashlib.sha256).digest() if token else None

    def session_cookie(self, role: str, now: float) -> str:
        expiry = int(now) + SESSION_SECONDS
        return f"{role}.{expiry}.{self._signature(role, expiry)}"

    def _signature(self, role: str, expiry: int) -> str:
        key = self._key(role)
        assert key is not None
        return hmac.new(key, f"{role}.{expiry}".encode(), hashlib.sha256).hexdigest()

    def session_role(self, cookie: str | None, now: float) -> str | None:
        """The role a session cookie carries, when it is ours, signed by a current token and not expired."""
        role, _, rest = (cookie or "").partition(".")
        expiry_text, _, signature = rest.partition(".")
        if (
            role not in (ADMIN, READ)
            or not (expiry_text.isascii() and expiry_text.isdigit())
            or self._key(role) is None
        ):
            return None
        expected = self._signature(role, int(expiry_text))
        if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "surrogateescape")):
            return None
        return role if int(expiry_text) > now else None


def bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def same_origin(origin: str | None, fetch_site: str | None, host: str | None, scheme: str) -> bool:
    """Whether a browser says this request comes from our own pages. A request that says
    nothing is refused: every browser that keeps cookies sends one of the two on a POST. When
    both are sent, both must say so: an `Origin` of another site is never outvoted."""
    if origin is not None:
        if origin == "null" or not host:
            return False
        parts = urlsplit(origin)
        if parts.scheme != scheme or parts.netloc.lower() != host.lower():
            return False
        return fetch_site in (None, "same-origin")
    return fetch_site == "same-origin"


def local_path(wanted: str | None) -> str:
    """Where a browser goes after signing in: `wanted` when it is a path of this server, else `/`.
    Never another host, however it is spelled: `//evil`, `https://x`, `/\\evil` (browsers read a
    backslash as a slash), their percent-encoded forms, control characters (a browser drops tabs
    and newlines from a URL: `/\t/evil` is `//evil`)."""
    if not wanted:
        return "/"
    decoded = wanted
    for _ in range(3):  # a value decoded more than once along the way is still judged
        decoded = unquote(decoded)
    for text in (wanted, decoded):
        if any(ord(ch) < 0x20 or ch == "\x7f" for ch in text):
            return "/"
        if not text.startswith("/") or text.startswith("//") or "\\" in text:
            return "/"
        parts = urlsplit(text)
        if parts.scheme or parts.netloc:
            return "/"
    return wanted

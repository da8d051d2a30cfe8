"""Who may press "ask now": operators, and only when `dashboard.ask_enabled` is true.

An operator signs in with `dashboard.operator_token` and gets a session cookie (HttpOnly,
SameSite=Strict) holding a session id and a CSRF token the page sends back with each ask; a
script may instead send `Authorization: Bearer <token>`. The cookie is signed, but a signed
cookie alone stays valid wherever it is copied to, so the session ids live here too: signing
out removes the id and the old cookie no longer signs anyone in. They live in memory, as the
cookies' signing key does, so a restart signs everyone out. With asking disabled, `Disabled`
is the null object: nobody is an operator and there is nothing to sign in to.
"""

from __future__ import annotations

import hmac
import secrets
import threading
from typing import Protocol

from flask import request, session

from fleet_common.config import DashboardConfig


class Operators(Protocol):
    enabled: bool

    def sign_in(self, token: str) -> bool: ...

    def sign_out(self) -> None: ...

    def is_operator(self) -> bool: ...

    def may_ask(self) -> bool:
        """An operator, and the request carries proof it came from our page (or a bearer token)."""

    def csrf(self) -> str | None: ...


class Disabled:
    enabled = False

    def sign_in(self, token: str) -> bool:
        return False

    def sign_out(self) -> None:
        session.clear()

    def is_operator(self) -> bool:
        return False

    def may_ask(self) -> bool:
        return False

    def csrf(self) -> str | None:
        return None


class TokenOperators:
    enabled = True
    max_sessions = 1000  # the oldest signed-in session is dropped beyond this many

    def __init__(self, token: str) -> None:
        self._token = token.encode()
        self._sessions: dict[str, None] = {}  # live session ids, oldest first
        self._lock = threading.Lock()

    def _matches(self, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self._token)

    def sign_in(self, token: str) -> bool:
        if not self._matches(token):
            return False
        self.sign_out()  # a new id on each sign-in: one planted before it is worth nothing after
        sid = secrets.token_urlsafe(24)
        with self._lock:
            self._sessions[sid] = None
            while len(self._sessions) > self.max_sessions:
                del self._sessions[next(iter(self._sessions))]
        session["operator"] = sid
        session["csrf"] = secrets.token_urlsafe(24)
        return True

    def sign_out(self) -> None:
        with self._lock:
            self._sessions.pop(str(session.get("operator")), None)
        session.clear()

    def _signed_in(self) -> bool:
        sid = session.get("operator")
        with self._lock:
            return isinstance(sid, str) and sid in self._sessions

    def _bearer(self) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and bool(token) and self._matches(token.strip())

    def is_operator(self) -> bool:
        return self._signed_in() or self._bearer()

    def may_ask(self) -> bool:
        if self._bearer():
            return True
        sent = request.headers.get("X-CSRF-Token", "")
        return self._signed_in() and bool(sent) and hmac.compare_digest(sent, session.get("csrf", ""))

    def csrf(self) -> str | None:
        return session.get("csrf") if self._signed_in() else None


def operators(cfg: DashboardConfig) -> Operators:
    if cfg.ask_enabled and cfg.operator_token:
        return TokenOperators(cfg.operator_token)
    return Disabled()

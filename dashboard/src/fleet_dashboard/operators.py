"""Who may press "ask now": operators, and only when `dashboard.ask_enabled` is true.

An operator signs in with `dashboard.operator_token` and gets a session cookie (HttpOnly,
SameSite=Strict) holding a session id and a CSRF token the page sends back with each ask; a
script may instead send `Authorization: Bearer <token>`. The cookie is signed, but a signed
cookie alone stays valid wherever it is copied to, so the session ids live here too: signing
out removes the id and the old cookie no longer signs anyone in. They live in memory, as the
cookies' signing key does, so a restart signs everyone out. With asking disabled, `Disabled`
is the null object: nobody is an operator and there is nothing to sign in to.

Wrong tokens, at the sign-in form or as a bearer token, are counted per client address
(`WrongTokens`): too many within a minute and that address gets 429 for every token it sends
for a while, so guessing the token from one address gains nothing.
"""

from __future__ import annotations

import hmac
import logging
import math
import secrets
import threading
import time
from typing import Callable, Protocol

from flask import g, request, session

from fleet_common.config import DashboardConfig
from fleet_common.errors import FleetError

log = logging.getLogger("fleet.dashboard")


class TooManyWrongTokens(FleetError):
    """This client address sent too many wrong tokens lately; it may try again in `retry_after_s`."""

    def __init__(self, address: str, retry_after_s: float) -> None:
        self.retry_after_s = max(1, math.ceil(retry_after_s))
        super().__init__(f"too many wrong operator tokens from {address}: try again in {self.retry_after_s} s")


class WrongTokens:
    """Per client address: after `limit` wrong tokens within `window_s`, every token from it is refused
    for `lockout_s`, the right one too (else the guessing would go on); other addresses are not affected."""

    max_addresses = 10000  # beyond this many, addresses with nothing recent are forgotten

    def __init__(self, limit: int = 5, window_s: float = 60.0, lockout_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window_s, self.lockout_s, self.clock = limit, window_s, lockout_s, clock
        self._wrong: dict[str, list[float]] = {}  # address -> times of its recent wrong tokens
        self._locked: dict[str, float] = {}  # address -> until when
        self._lock = threading.Lock()

    def check(self, address: str) -> None:
        with self._lock:
            until = self._locked.get(address)
            if until is not None and until > self.clock():
                raise TooManyWrongTokens(address, until - self.clock())

    def wrong(self, address: str) -> None:
        with self._lock:
            now = self.clock()
            recent = [t for t in self._wrong.get(address, []) if t > now - self.window_s] + [now]
            if len(recent) < self.limit:
                self._wrong[address] = recent
            else:
                self._wrong.pop(address, None)
                self._locked[address] = now + self.lockout_s
                log.warning("%d wrong operator tokens from %s within %.0f s: refusing its tokens for %.0f s",
                            len(recent), address, self.window_s, self.lockout_s)
            if len(self._wrong) + len(self._locked) > self.max_addresses:
                self._forget(now)

    def right(self, address: str) -> None:
        with self._lock:
            self._wrong.pop(address, None)

    def _forget(self, now: float) -> None:
        self._wrong = {a: ts for a, ts in self._wrong.items() if ts[-1] > now - self.window_s}
        self._locked = {a: until for a, until in self._locked.items() if until > now}


def client_address() -> str:
    return request.remote_addr or "an unknown address"


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

    def __init__(self, token: str, wrong_tokens: WrongTokens | None = None) -> None:
        self._token = token.encode()
        self.wrong_tokens = wrong_tokens or WrongTokens()
        self._sessions: dict[str, None] = {}  # live session ids, oldest first
        self._lock = threading.Lock()

    def _matches(self, token: str) -> bool:
        """Whether `token` is the operator token; raises TooManyWrongTokens for a client locked out."""
        address = client_address()
        self.wrong_tokens.check(address)
        if hmac.compare_digest(token.encode(), self._token):
            self.wrong_tokens.right(address)
            return True
        self.wrong_tokens.wrong(address)
        return False

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
        if "operator_bearer" not in g:  # asked more than once per request; counted once
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            g.operator_bearer = scheme.lower() == "bearer" and bool(token.strip()) and self._matches(token.strip())
        return bool(g.operator_bearer)

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

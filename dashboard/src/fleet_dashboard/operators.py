"""Who may press "ask now": operators, and only when `dashboard.ask_enabled` is true.

An operator signs in with `dashboard.operator_token` and gets a session cookie (HttpOnly,
SameSite=Strict) holding a CSRF token the page sends back with each ask; a script may
instead send `Authorization: Bearer <token>`. With asking disabled, `Disabled` is the null
object: nobody is an operator and there is nothing to sign in to.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Protocol

from flask import request, session

from fleet_common.config import DashboardConfig


class Operators(Protocol):
    enabled: bool

    def sign_in(self, token: str) -> bool: ...

    def is_operator(self) -> bool: ...

    def may_ask(self) -> bool:
        """An operator, and the request carries proof it came from our page (or a bearer token)."""

    def csrf(self) -> str | None: ...


class Disabled:
    enabled = False

    def sign_in(self, token: str) -> bool:
        return False

    def is_operator(self) -> bool:
        return False

    def may_ask(self) -> bool:
        return False

    def csrf(self) -> str | None:
        return None


class TokenOperators:
    enabled = True

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    def _matches(self, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self._token)

    def sign_in(self, token: str) -> bool:
        if not self._matches(token):
            return False
        session.clear()
        session["operator"] = True
        session["csrf"] = secrets.token_urlsafe(24)
        return True

    def _bearer(self) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and bool(token) and self._matches(token.strip())

    def is_operator(self) -> bool:
        return bool(session.get("operator")) or self._bearer()

    def may_ask(self) -> bool:
        if self._bearer():
            return True
        sent = request.headers.get("X-CSRF-Token", "")
        return bool(session.get("operator")) and bool(sent) and hmac.compare_digest(sent, session.get("csrf", ""))

    def csrf(self) -> str | None:
        return session.get("csrf") if session.get("operator") else None


def operators(cfg: DashboardConfig) -> Operators:
    if cfg.ask_enabled and cfg.operator_token:
        return TokenOperators(cfg.operator_token)
    return Disabled()

"""authenticate(): one console login, local account or LDAP, throttled and logged.

Order: the throttle counts the attempt first; then the local accounts file; a name it does
not hold goes to LDAP when console.ldap is set, else costs one dummy scrypt (an unknown
name takes as long as a wrong password). Every refusal reads the same to the client
("wrong name or password"); the log says why. The password is never logged.
"""
from __future__ import annotations

import logging
import time
import unicodedata

from milters.core.config import ConsoleSettings
from milters.core.directory import DirectoryDown
from milters.core.errors import ConfigError, LoginError, LoginRefused, LoginThrottled, StoreError
from milters.core.eventlog import log_event
from milters.core.store import Store
from mta.console import ldap_login
from mta.console.accounts import load_accounts
from mta.console.identity import Actor
from mta.console.throttle import Throttle
from mta.passwords import verify_password

__all__ = ["Actor", "LoginError", "LoginRefused", "LoginThrottled", "authenticate"]

WRONG = "wrong name or password"
_MAX_NAME, _MAX_PASSWORD = 256, 1024


def _name_problem(name: str) -> str | None:
    if not name:
        return "empty name"
    if len(name) > _MAX_NAME:
        return "name too long"
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in name):
        return "control character in the name"
    if name != name.strip():  # a directory ignores it: " alice" would bind as alice
        return "white space around the name"
    return None


def _refuse(name: str, source: str, reason: str, message: str = WRONG) -> LoginRefused:
    log_event("console_login_failed", level=logging.WARNING, name=name[:_MAX_NAME],
              source=source, reason=reason)
    return LoginRefused(message, reason)


def authenticate(settings: ConsoleSettings, store: Store, name: str, password: str,
                 source: str, *, now: float | None = None) -> Actor:
    """The Actor for a right name and password; LoginRefused or LoginThrottled otherwise."""
    now = time.time() if now is None else now
    throttle = Throttle(store)
    try:
        wait = throttle.attempt(name, source, now)
    except StoreError as exc:  # no throttle, no login: fail closed
        raise _refuse(name, source, f"store unavailable: {exc}",
                      "logins are unavailable right now; try again later") from None
    if wait is not None:
        log_event("console_login_throttled", level=logging.WARNING, name=name[:_MAX_NAME],
                  source=source, retry_after=wait)
        raise LoginThrottled(wait)
    actor = _check(settings, name, password, source)
    try:
        throttle.succeeded(name, source, now)
    except StoreError:
        pass  # the attempt stays counted: harmless
    log_event("console_login", name=actor.name, source=source, role=actor.role)
    return actor


def _check(settings: ConsoleSettings, name: str, password: str, source: str) -> Actor:
    problem = _name_problem(name) or ("password too long" if len(password) > _MAX_PASSWORD
                                      else None)
    if problem:
        verify_password(password[:_MAX_PASSWORD], None)  # the same cost as any miss
        raise _refuse(name, source, problem)
    try:
        account = load_accounts(settings.users_file).get(name)
    except ConfigError as exc:
        verify_password(password, None)
        raise _refuse(name, source, f"accounts file unusable: {exc.problems[0]}") from None
    if account is not None:
        if not verify_password(password, account.password):
            raise _refuse(name, source, "wrong password")
        return Actor(name, account.role, account.addresses, source)
    if settings.ldap is None:
        verify_password(password, None)
        raise _refuse(name, source, "no such account")
    try:
        user = ldap_login.bind(settings.ldap, name, password)
    except DirectoryDown as exc:
        raise _refuse(name, source, f"directory unavailable: {exc}",
                      "the directory cannot be reached; try again later") from None
    if user is None:
        raise _refuse(name, source, "directory refused the bind" if password
                      else "empty password")
    if user.role is None:
        raise _refuse(name, source, f"{user.dn} is in no group that gives a role")
    return Actor(name, user.role, user.addresses, source)

"""Console logins against LDAP or Active Directory: a simple bind as the user (ldap3).

The login name goes into a DN (user_dn: escaped per RFC 4514) or a search filter
(search_filter: escaped per RFC 4515), so `*)(uid=*` or `admin,ou=x` stays one odd name
and never becomes another entry. An empty password is refused before any bind: LDAP treats
a bind with a DN and no password as an *unauthenticated* bind that succeeds (RFC 4513 5.1.2).
Groups (group_attribute on the entry, or a search under group_search_base) give the role.
"""
from __future__ import annotations

import math
import ssl
from dataclasses import dataclass

from ldap3 import BASE, SIMPLE, SUBTREE, Connection, Server, Tls
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn

from milters.core.config import CONSOLE_ROLES, LdapSettings, normalize_dn
from milters.core.errors import ConfigError
from milters.core.secrets import read_secret


class DirectoryDown(Exception):
    """The directory could not be reached or did not answer in time."""


@dataclass(frozen=True)
class DirectoryUser:
    dn: str
    role: str | None  # None: bound, but in no group that gives a role
    addresses: frozenset[str]


def _server(settings: LdapSettings) -> Server:
    tls = None
    if settings.starttls or settings.url.startswith("ldaps://"):
        tls = Tls(validate=ssl.CERT_REQUIRED, version=ssl.PROTOCOL_TLS_CLIENT,
                  ca_certs_file=str(settings.ca_file) if settings.ca_file else None)
    return Server(settings.url, use_ssl=settings.url.startswith("ldaps://"), tls=tls,
                  connect_timeout=settings.timeout, get_info="NO_INFO")


def _connect(settings: LdapSettings, dn: str | None, password: str | None) -> Connection | None:
    """A bound connection, or None when the directory says the credentials are wrong."""
    conn = Connection(_server(settings), user=dn, password=password,
                      authentication=SIMPLE if dn else None, # ldap3 packs this into SO_RCVTIMEO as whole seconds
                      receive_timeout=max(1, math.ceil(settings.timeout)),
                      raise_exceptions=False, read_only=True, auto_bind="NONE")
    try:
        conn.open()
        if settings.starttls and not conn.start_tls():
            raise DirectoryDown(f"StartTLS failed: {conn.result.get('description')}")
        if not conn.bind():
            result = conn.result or {}
            if result.get("result") == 49:  # invalidCredentials
                conn.unbind()
                return None
            raise DirectoryDown(f"bind failed: {result.get('description') or result}")
    except (LDAPException, OSError) as exc:
        conn.unbind()
        raise DirectoryDown(str(exc) or type(exc).__name__) from None
    return conn


def _search(conn: Connection, base: str, query: str, scope: str,
            attributes: list[str], limit: int = 2) -> list[dict]:
    try:
        conn.search(base, query, search_scope=scope, attributes=attributes, size_limit=limit)
    except (LDAPException, OSError) as exc:
        raise DirectoryDown(str(exc) or type(exc).__name__) from None
    if conn.result.get("result") not in (0, 4, 32):  # success, sizeLimitExceeded, noSuchObject
        raise DirectoryDown(f"search failed: {conn.result.get('description')}")
    return [entry for entry in conn.response or [] if entry.get("type") == "searchResEntry"]


def _values(entry: dict, attribute: str) -> list[str]:
    found = (entry.get("attributes") or {}).get(attribute) or []
    return [str(v) for v in (found if isinstance(found, list) else [found])]


def _dn(text: str) -> str:
    try:
        return normalize_dn(text)
    except LDAPException:  # not a DN: matches no configured group
        return ""


def _role(settings: LdapSettings, groups: set[str]) -> str | None:
    for role in CONSOLE_ROLES:  # strongest first
        wanted = settings.roles.get(role, ())
        if "*" in wanted or groups.intersection(wanted):
            return role
    return None


def bind(settings: LdapSettings, name: str, password: str) -> DirectoryUser | None:
    """The user when `password` binds as `name`, None when it does not (wrong password,
    unknown or ambiguous name); DirectoryDown when the directory cannot answer."""
    if not password:
        return None  # an empty password would be an unauthenticated bind that "succeeds"
    attributes = [settings.mail_attribute, settings.group_attribute]
    if settings.user_dn:
        dn = settings.user_dn.replace("{name}", escape_rdn(name))
        entry = None
    else:
        try:
            reader_password = (read_secret(settings.bind_password, "console.ldap",
                                           file_key="bind_password_file")
                               if settings.bind_dn else None)
        except ConfigError as exc:
            raise DirectoryDown(str(exc)) from None
        reader = _connect(settings, settings.bind_dn or None, reader_password)
        if reader is None:
            raise DirectoryDown("the directory refused bind_dn's password")
        query = settings.search_filter.replace("{name}", escape_filter_chars(name))
        try:
            entries = _search(reader, settings.search_base, query, SUBTREE, attributes)
        finally:
            reader.unbind()
        if len(entries) != 1:
            return None  # unknown, or a filter that matches several: never guess
        entry = entries[0]
        dn = entry["dn"]
    conn = _connect(settings, dn, password)
    if conn is None:
        return None
    try:
        if entry is None:  # read our own entry, as ourselves
            own = _search(conn, dn, "(objectClass=*)", BASE, attributes)
            entry = own[0] if own else {"dn": dn}
        groups = {_dn(g) for g in _values(entry, settings.group_attribute)}
        if settings.group_search_base:
            member = escape_filter_chars(entry["dn"])
            found = _search(conn, settings.group_search_base,
                            f"(|(member={member})(uniqueMember={member}))", SUBTREE, [],
                            limit=1000)
            groups |= {_dn(g["dn"]) for g in found}
    finally:
        conn.unbind()
    addresses = frozenset(a.lower() for a in _values(entry, settings.mail_attribute) if "@" in a)
    return DirectoryUser(entry["dn"], _role(settings, groups), addresses)

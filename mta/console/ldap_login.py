"""Console logins against LDAP or Active Directory: a simple bind as the user (ldap3).

The login name goes into a DN (user_dn: escaped per RFC 4514) or a search filter
(search_filter: escaped per RFC 4515), so `*)(uid=*` or `admin,ou=x` stays one odd name
and never becomes another entry. An empty password is refused before any bind: LDAP treats
a bind with a DN and no password as an *unauthenticated* bind that succeeds (RFC 4513 5.1.2).
Groups (group_attribute on the entry, or a search under group_search_base) give the role.
"""
from __future__ import annotations

from dataclasses import dataclass

from ldap3 import BASE, SUBTREE
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn

from milters.core.config_console import CONSOLE_ROLES, LdapSettings
from milters.core.directory import (DirectoryDown, dn_or_empty, entry_values, ldap_connect,
                                    search_entries)
from milters.core.errors import ConfigError
from milters.core.secrets import read_secret


@dataclass(frozen=True)
class DirectoryUser:
    dn: str
    role: str | None  # None: bound, but in no group that gives a role
    addresses: frozenset[str]


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
        reader = ldap_connect(settings, settings.bind_dn or None, reader_password)
        if reader is None:
            raise DirectoryDown("the directory refused bind_dn's password")
        query = settings.search_filter.replace("{name}", escape_filter_chars(name))
        try:
            entries = search_entries(reader, settings.search_base, query, SUBTREE, attributes)
        finally:
            reader.unbind()
        if len(entries) != 1:
            return None  # unknown, or a filter that matches several: never guess
        entry = entries[0]
        dn = entry["dn"]
    conn = ldap_connect(settings, dn, password)
    if conn is None:
        return None
    try:
        if entry is None:  # read our own entry, as ourselves
            own = search_entries(conn, dn, "(objectClass=*)", BASE, attributes)
            entry = own[0] if own else {"dn": dn}
        groups = {dn_or_empty(g) for g in entry_values(entry, settings.group_attribute)}
        if settings.group_search_base:
            member = escape_filter_chars(entry["dn"])
            found = search_entries(conn, settings.group_search_base,
                            f"(|(member={member})(uniqueMember={member}))", SUBTREE, [],
                            limit=1000)
            groups |= {dn_or_empty(g["dn"]) for g in found}
    finally:
        conn.unbind()
    addresses = frozenset(a.lower() for a in entry_values(entry, settings.mail_attribute)
                          if "@" in a)
    return DirectoryUser(entry["dn"], _role(settings, groups), addresses)

"""The gateway config's `console:` section: who may log in to the web console (local
accounts in console.users_file, LDAP or Active Directory in console.ldap), where it listens
and how its sessions live. config.py reads it as one part of the gateway config.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from .policy.schema import Bool, CaFile, Duration, Field, ListOf, Str, Struct
from .secrets import SecretSource


# -- the console's logins (console.users_file, console.ldap) ----------------------------------
CONSOLE_ROLES = ("admin", "auditor", "user")  # strongest first: the first role that matches wins


@dataclass(frozen=True)
class LdapSettings:
    """LDAP/AD bind for console logins: a DN template, or a search with a reader account."""

    url: str
    starttls: bool = False
    ca_file: Path | None = None  # ldaps/starttls: the CAs to trust; None = the system's
    timeout: float = 5.0
    user_dn: str = ""  # "uid={name},ou=people,dc=example,dc=jp"; "" = search
    search_base: str = ""
    search_filter: str = "(uid={name})"
    bind_dn: str = ""  # the reader account for the search; "" = anonymous search
    bind_password: SecretSource = SecretSource()
    group_attribute: str = "memberOf"
    group_search_base: str = ""  # set: groups are entries under it naming the user as member
    # role -> group DNs (normalized); ("*",) = every user who binds
    roles: dict[str, tuple[str, ...]] = field(default_factory=dict)
    mail_attribute: str = "mail"


CONSOLE_LANGUAGES = ("auto", "ja", "en")


@dataclass(frozen=True)
class ConsoleSettings:
    """`console:`: who may log in (users_file, ldap), where the web console listens and how
    its sessions live. Written in a config (configured): serve starts the console."""

    users_file: Path = Path("var/console-users")
    ldap: LdapSettings | None = None
    listen: str = "127.0.0.1:8026"
    tls_cert: Path | None = None  # with tls_key: HTTPS (required off loopback)
    tls_key: Path | None = None
    secret_key_file: Path = Path("var/console-secret")  # signs the session cookies
    session_idle: float = 30 * 60.0  # a session unused this long ends
    session_max: float = 12 * 3600.0  # and every session ends this long after its login
    language: str = "auto"  # auto: the browser's Accept-Language
    configured: bool = True  # False: no `console:` in the config (serve starts no console)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


# -- console.listen: loopback, or TLS -------------------------------------------------------
def console_listen_problem(listen: str, tls: bool) -> str | None:
    """Why the console may not listen on `listen` (HOST:PORT), or None. Off loopback the
    session cookies and passwords would cross the network in clear: TLS is required."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        return "listen is HOST:PORT, like 127.0.0.1:8026 or [::1]:8026"
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host == "localhost":
        return None
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        return "listen's host is an IP address (or localhost), like 127.0.0.1:8026"
    if not loopback and not tls:
        return ("listen is not a loopback address; set console.tls: {cert, key} so that "
                "passwords and session cookies do not cross the network in clear")
    return None


# -- the console's logins: console.users_file and console.ldap ---------------------------------
class _DnTemplate(Str):
    """An LDAP DN or filter template that must name the login once, as {name} (or {dn})."""

    def __init__(self, placeholder: str, kind: str) -> None:
        super().__init__()
        self.placeholder, self.expected = placeholder, f"an LDAP {kind} with {placeholder}"

    def parse(self, text: str) -> str:
        if text.count(self.placeholder) != 1:
            raise ValueError(f"must contain {self.placeholder} exactly once")
        try:
            text.replace(self.placeholder, "x").format()  # no other {braces}
        except (IndexError, KeyError, ValueError):
            raise ValueError(f"only {self.placeholder} may be in braces") from None
        return text


class _GroupDn(Str):
    expected = "a group DN, or \"*\" (everyone who binds)"

    def parse(self, text: str) -> str:
        if text == "*":
            return text
        from ldap3.core.exceptions import LDAPInvalidDnError
        from ldap3.utils.dn import parse_dn
        try:
            parse_dn(text, strip=True)
        except LDAPInvalidDnError:
            raise ValueError("not a valid DN (RFC 4514)") from None
        return normalize_dn(text)


def normalize_dn(dn: str) -> str:
    """A DN for comparison: attribute types and values lower-cased, spaces around = and ,
    gone (`CN=Admins, OU=Groups` and `cn=admins,ou=groups` are one group)."""
    from ldap3.utils.dn import parse_dn
    return ",".join(f"{kind.lower()}={value.lower()}" for kind, value, _ in parse_dn(dn, strip=True))


def _ldap_settings(base: Path, url: str, starttls: bool, ca_file: Path | None, timeout: float,
                   user_dn: str, search_base: str, search_filter: str, bind_dn: str,
                   bind_password_file: str, group_attribute: str, group_search_base: str,
                   roles: dict[str, list[str]], mail_attribute: str) -> LdapSettings:
    if not url.startswith(("ldap://", "ldaps://")):
        raise ValueError("url must be ldap://HOST[:PORT] or ldaps://HOST[:PORT]")
    if starttls and url.startswith("ldaps://"):
        raise ValueError("starttls is for ldap:// (ldaps:// is TLS from the start)")
    if ca_file is not None and not (starttls or url.startswith("ldaps://")):
        raise ValueError("ca_file needs ldaps:// or starttls: true")
    if bool(user_dn) == bool(search_base):
        raise ValueError("set user_dn (bind as a DN made from the name) or search_base "
                         "(find the user's entry first), one of the two")
    if bind_password_file and not bind_dn:
        raise ValueError("bind_password_file needs bind_dn")
    if bind_dn and not bind_password_file:
        raise ValueError("bind_dn needs bind_password_file (an empty password would be an "
                         "anonymous bind)")
    if not any(roles.values()):
        raise ValueError("roles must map at least one of admin, auditor, user to groups")
    return LdapSettings(url, starttls, ca_file, timeout, user_dn, search_base, search_filter,
                        bind_dn, SecretSource(file=str(base / bind_password_file)
                                              if bind_password_file else ""),
                        group_attribute, group_search_base,
                        {role: tuple(groups) for role, groups in roles.items() if groups},
                        mail_attribute)


def console_spec(base: Path) -> Struct:
    defaults = ConsoleSettings()

    def build(users_file: str, ldap: LdapSettings | None, listen: str, tls: dict | None,
              secret_key_file: str, session_idle: float, session_max: float,
              language: str) -> ConsoleSettings:
        problem = console_listen_problem(listen, tls is not None)
        if problem:
            raise ValueError(f"{problem} (got {listen})")
        if session_idle > session_max:
            raise ValueError("session_idle is longer than session_max")
        return ConsoleSettings(base / users_file, ldap, listen,
                               base / tls["cert"] if tls else None,
                               base / tls["key"] if tls else None, base / secret_key_file,
                               session_idle, session_max, language)

    groups = ListOf(_GroupDn())
    ldap = Struct({
        "url": Field(Str(), doc="The directory: ldap://HOST[:PORT] or ldaps://HOST[:PORT]."),
        "starttls": Field(Bool(), False, doc="Upgrade ldap:// with StartTLS before binding."),
        "ca_file": Field(CaFile(base), None,
                         doc="For ldaps:// or starttls, the CA certificates to trust; not set ="
                             " the system's. The server's name is always checked."),
        "timeout": Field(Duration(minimum=0.1), 5.0,
                         doc="Time for connecting and for each LDAP operation; a directory that"
                             " does not answer refuses the login."),
        "user_dn": Field(_DnTemplate("{name}", "DN"), "",
                         doc="Bind as this DN, {name} replaced by the login name (escaped, RFC "
                             "4514), e.g. uid={name},ou=people,dc=example,dc=jp. Or use "
                             "search_base."),
        "search_base": Field(Str(), "",
                             doc="Find the user's entry under this DN with search_filter, then "
                                 "bind as it (Active Directory: the users' OU)."),
        "search_filter": Field(_DnTemplate("{name}", "filter"), "(uid={name})",
                               doc="The search for the user's entry, {name} escaped (RFC 4515); "
                                   "AD: (sAMAccountName={name}). Exactly one entry must match."),
        "bind_dn": Field(Str(), "",
                         doc="The account that searches (with bind_password_file); not set = "
                             "anonymous search."),
        "bind_password_file": Field(Str(), "",
                                    doc="File holding bind_dn's password; must not be readable "
                                        "by others."),
        "group_attribute": Field(Str(), "memberOf",
                                 doc="The user's attribute listing their groups' DNs (memberOf "
                                     "in AD and OpenLDAP's memberof overlay)."),
        "group_search_base": Field(Str(), "",
                                   doc="Instead of group_attribute: groups are the entries under "
                                       "this DN whose member or uniqueMember is the user."),
        "roles": Field(Struct({role: Field(groups, (), doc=text) for role, text in (
            ("admin", "Group DNs whose members are admins (everything)."),
            ("auditor", "Group DNs whose members are auditors (read everything, change "
                        "nothing)."),
            ("user", "Group DNs whose members are users (their own mail only); \"*\" = "
                     "everyone who binds."))},
            build=lambda **roles: roles, expected="roles: admin, auditor, user"),
            doc="Which groups give which role; the strongest role a user's groups give wins, "
                "and someone in none of them cannot log in."),
        "mail_attribute": Field(Str(), "mail",
                                doc="The attribute with a user's mail addresses (the mail a "
                                    "user-role login may see)."),
    }, build=lambda **values: _ldap_settings(base, **values),
        expected="LDAP settings: url, user_dn or search_base, roles, ...")
    return Struct({
        "users_file": Field(Str(), "var/console-users",
                            doc="The console's local accounts (`mailmoat user add NAME --role "
                                "ROLE`); mode 0600, refused when others may read it."),
        "ldap": Field(ldap, None,
                      doc="Log in against LDAP or Active Directory (a bind as the user); "
                          "groups map to roles. Not set: local accounts only."),
        # -- the web console itself (mta/console: app, sessions, server) --
        "listen": Field(Str(), defaults.listen,
                        doc="HOST:PORT of the web console and its JSON API; off loopback it "
                            "needs tls."),
        "tls": Field(Struct({
            "cert": Field(Str(), doc="Certificate chain file (PEM) of the console's HTTPS."),
            "key": Field(Str(), doc="Private key file (PEM); must not be readable by group or "
                                    "others."),
        }), None, doc="HTTPS for the console: the certificate and key files. Not set: plain "
                      "HTTP, allowed on loopback only."),
        "secret_key_file": Field(Str(), str(defaults.secret_key_file),
                                 doc="The key that signs session cookies; made (mode 0600) on "
                                     "first start when missing, refused when group or others "
                                     "may read it."),
        "session_idle": Field(Duration(minimum=60), defaults.session_idle,
                              doc="A console session unused this long ends (log in again)."),
        "session_max": Field(Duration(minimum=60), defaults.session_max,
                             doc="Every console session ends this long after its login."),
        "language": Field(Str(CONSOLE_LANGUAGES), defaults.language,
                          doc="The pages' language: ja, en, or auto (the browser's "
                              "Accept-Language); each user can switch."),
    }, build=build, expected="console settings")

"""Passwords for the encrypted ZIP: random per mail, or a fixed pattern by date.

The password travels in a second mail and is often read off a screen or a printout and
typed by hand, so look-alike characters are left out by default.
"""
from __future__ import annotations

import re
import secrets
import string
from datetime import datetime

# pwgen -B's set (characters confused in common fonts and when read aloud: B/8, G/6, I/l/1,
# O/0/Q/D, S/5, Z/2) plus "o" and "|", which look like 0 and l as much as their partners.
AMBIGUOUS = "B8G6I1l0OQDS5Z2o|"
# Letters and digits only: a double-click selects a password for copying only while it has
# no punctuation, and symbols sit on different keys on JIS and US keyboards. Length makes up
# the entropy: 12 characters from the 47 left after AMBIGUOUS are about 66 bits.
DEFAULT_ALPHABET = string.ascii_letters + string.digits
MIN_LENGTH = 4

# Numeric date/time directives only: names (%a, %b), %c, %x and %p follow the locale, so the
# same pattern would give different passwords on differently configured hosts.
_ALLOWED_DIRECTIVES = frozenset("YymdHMSjGVuwUW%")
_DIRECTIVE = re.compile(r"%(.?)", re.DOTALL)


def generate_password(length: int = 12, alphabet: str = DEFAULT_ALPHABET,
                      exclude_ambiguous: bool = True) -> str:
    """A random password from `alphabet` (via `secrets`), with at least one digit and one
    letter when the alphabet has both."""
    if length < MIN_LENGTH:
        raise ValueError(f"a password needs at least {MIN_LENGTH} characters, not {length}")
    # dict.fromkeys: a character listed twice must not be drawn twice as often.
    pool = "".join(dict.fromkeys(c for c in alphabet
                                 if not (exclude_ambiguous and c in AMBIGUOUS)))
    if not pool:
        raise ValueError("the alphabet is empty" + (" without the ambiguous characters"
                                                    if exclude_ambiguous else ""))
    need_digit = any(c.isdigit() for c in pool)
    need_letter = any(c.isalpha() for c in pool)
    # Draw whole passwords until one qualifies: patching a position would make that position
    # (and so the password) less random than the rest.
    while True:
        password = "".join(secrets.choice(pool) for _ in range(length))
        if ((not need_digit or any(c.isdigit() for c in password))
                and (not need_letter or any(c.isalpha() for c in password))):
            return password


def fixed_password(pattern: str, when: datetime) -> str:
    """The password for `when` from a strftime pattern such as "pass%Y%m" ("%%" is a "%")."""
    for match in _DIRECTIVE.finditer(pattern):
        if match.group(1) not in _ALLOWED_DIRECTIVES:  # also a lone % at the end
            # Never the pattern itself in the message: it is a secret.
            raise ValueError(
                f"the password pattern uses %{match.group(1)}, which is not allowed; use"
                f" %{' %'.join(sorted(_ALLOWED_DIRECTIVES - {'%'}))} or %% for a '%'")
    password = when.strftime(pattern)
    # Other tools turn non-ASCII passwords into different bytes (Explorer: the ANSI code
    # page, 7-Zip: UTF-8), so the recipient could not open the ZIP.
    if not password or not (password.isascii() and password.isprintable()):
        raise ValueError("the password pattern must give printable ASCII (an empty or "
                         "non-ASCII result cannot be typed the same everywhere)")
    return password

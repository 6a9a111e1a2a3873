"""ZIP entry names that every recipient can extract: safe, short enough, unique, encodable.

The names come from the sender's MIME headers, so they are hostile input: path segments,
control characters, Windows device names. Japanese Windows Explorer reads entry names in
CP932 (no UTF-8 flag), so a name CP932 cannot hold gets a neutral alias instead of turning
into mojibake.
"""
from __future__ import annotations

import re

CHARSETS = ("cp932", "utf-8")
MAX_NAME_BYTES = 255  # NTFS and ext4 limit one path component to about this
MAX_EXT_CHARS = 20  # a longer "extension" is really part of the name

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
# Bidirectional controls let "invoice\u202eFDP.exe" display as "invoiceexe.PDF": a classic
# attachment spoof, so they go too.
_BIDI = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_RESERVED = re.compile(r'[<>:"|?*]')
_SEPARATORS = re.compile(r"[/\\]")
# Windows refuses these as a file's name whatever the extension ("CON.txt", "com1.tar.gz");
# Microsoft's documentation adds the superscript digits.
_DEVICES = frozenset(
    ["CON", "PRN", "AUX", "NUL"]
    + [f"{port}{digit}" for port in ("COM", "LPT") for digit in "123456789\u00b9\u00b2\u00b3"])


def split_ext(name: str) -> tuple[str, str]:
    """("report.final", ".pdf"); no extension for ".profile", "README" or an absurd suffix."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem or len(ext) + 1 > MAX_EXT_CHARS:
        return name, ""
    return stem, dot + ext


def safe_name(name: str, fallback: str = "attachment") -> str:
    """A single file name that cannot escape the extraction directory or trip Windows."""
    name = _BIDI.sub("", _CONTROL.sub("", name))
    segments = [s for s in _SEPARATORS.split(name) if s.strip(" .")]
    name = segments[-1] if segments else ""
    name = _RESERVED.sub("_", name).strip(" .")
    if not name:
        return fallback
    # Windows ignores spaces before the first dot when it checks for devices: "CON .txt".
    if name.split(".", 1)[0].rstrip(" ").upper() in _DEVICES:
        name = "_" + name
    return name


def _cut(text: str, max_bytes: int, encoding: str) -> str:
    """The longest prefix of text that fits in max_bytes, whole characters only."""
    used = 0
    for index, char in enumerate(text):
        used += len(char.encode(encoding))
        if used > max_bytes:
            return text[:index]
    return text


def cap_length(name: str, max_bytes: int = MAX_NAME_BYTES, encoding: str = "utf-8") -> str:
    """Shorten the stem until the name fits in max_bytes in that encoding; keep the extension.

    Every character must be encodable (UnicodeEncodeError otherwise): aliasing comes first.
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be positive, not {max_bytes}")
    if len(name.encode(encoding)) <= max_bytes:
        return name
    stem, ext = split_ext(name)
    budget = max_bytes - len(ext.encode(encoding))
    if budget < 1:  # an extension that fills the budget on its own: cut the whole name
        stem, ext, budget = name, "", max_bytes
    cut = _cut(stem, budget, encoding)
    # A cut that ends in a space or dot would end the name in one on Windows, which drops it.
    return (cut.rstrip(" .") or cut) + ext


def _fold(name: str) -> str:
    """Windows compares names through a simple per-character upper-case table: "ß" stays."""
    return "".join(up if len(up := char.upper()) == 1 else char for char in name)


def unique_names(names: list[str], *, max_bytes: int | None = None,
                 encoding: str = "utf-8") -> list[str]:
    """Later duplicates (case-insensitive) become stem(1).ext, stem(2).ext, ...

    Every name in the list is reserved up front, so a renamed duplicate never takes a name
    that comes later. With max_bytes, the stem is shortened to make room for the counter.
    """
    taken = {_fold(name) for name in names}
    used: set[str] = set()
    result = []
    for name in names:
        folded = _fold(name)
        if folded in used:
            stem, ext = split_ext(name)
            counter = 0
            while folded in taken:
                counter += 1
                suffix = f"({counter}){ext}"
                head = stem
                if max_bytes is not None:
                    head = _cut(stem, max(max_bytes - len(suffix.encode(encoding)), 0), encoding)
                name = head + suffix
                folded = _fold(name)
            taken.add(folded)
        used.add(folded)
        result.append(name)
    return result


def _check_charset(charset: str) -> str:
    if charset not in CHARSETS:
        raise ValueError(f"unknown charset {charset!r}; use one of {', '.join(CHARSETS)}")
    return charset


def encodable(name: str, charset: str) -> bool:
    """True if `name` survives a trip through `charset` unchanged.

    CP932 as Windows has it (Python's codec): NEC specials (①, ㈱) and IBM extensions (髙)
    are in; characters CP932 maps one way only ("〜" U+301C becomes "～" U+FF5E) are out.
    So are the single bytes 0x80, 0xA0, 0xFD-0xFF (U+0080, U+F8F0-U+F8F3): no JIS character,
    and glibc's iconv, which libarchive converts with, refuses them.
    """
    if _check_charset(charset) == "utf-8":
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates, e.g. from surrogateescape
            return False
        return True
    try:
        if name.encode("cp932").decode("cp932") != name:
            return False
    except UnicodeError:
        return False
    return all(ord(char) < 0x80 or len(code := char.encode("cp932")) == 2
               or 0xA1 <= code[0] <= 0xDF for char in name)


def entry_names(names: list[str], charset: str, alias: str = "attachment{n}{ext}") -> list[str]:
    """The final ZIP entry names for a mail's attachment names, in order.

    Each name is made safe; one the charset cannot hold becomes `alias` ({n}: its 1-based
    position, {ext}: its extension if the charset holds that, else ""); then it is capped at
    255 bytes in the charset and made unique.
    """
    _check_charset(charset)
    result = []
    for position, raw in enumerate(names, 1):
        name = safe_name(raw)
        if not encodable(name, charset):
            ext = split_ext(name)[1]
            try:
                replacement = alias.format(n=position, ext=ext if encodable(ext, charset) else "")
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"alias {alias!r}: only {{n}} and {{ext}} may be used") from exc
            name = safe_name(replacement)
            if not encodable(name, charset):
                raise ValueError(f"alias {alias!r} is not encodable in {charset}")
        result.append(cap_length(name, MAX_NAME_BYTES, charset))
    return unique_names(result, max_bytes=MAX_NAME_BYTES, encoding=charset)

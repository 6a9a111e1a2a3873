"""A header field as it goes to a milter (SMFIC_HEADER): always a packet the milter can take.

libmilter drops the whole connection (the MTA then applies the milter's on_failure, a 451
for the message) when a packet's data is longer than its negotiated maximum, and pymilter
decodes a header NAME as strict UTF-8 in C before any Python code runs: a name with one
byte that is not UTF-8 made the callback fail at a stage that sends no reply, after which
libmilter ignored the rest of the message and the MTA waited for an end-of-message reply
that never came. So what we send is made safe here, for every milter:

- too long: cut to the limit, as Postfix's header_size_limit does (it keeps the start of a
  header and discards the excess). The chain cuts the message's header the same way
  (session._cut_field), so what is delivered is what the milters judged. The caller
  logs it (event=header_truncated).
- a name that is not UTF-8: sent as Latin-1 read as text (each byte one character), so any
  milter can decode it; RFC 5322 names are printable ASCII, so no real name changes, and
  such a name never matches a milter's chgheader anyway (edits_apply.field_name).
- NUL: would end the C string early and hide the rest from the milter (Postfix's milter8
  sends C strings, so it cuts there); we send a space instead, so the milter sees it all.
"""
from __future__ import annotations

from dataclasses import dataclass

# libmilter's MILTER_MAX_DATA_SIZE: the longest packet data (command byte excluded) it
# accepts unless the milter announced a larger one in its OPTNEG reply (SMFIP_MDS_*).
DEFAULT_MAX_DATA = 65535
SMFIP_MDS_256K = 0x10000000
SMFIP_MDS_1M = 0x20000000
MDS_BITS = SMFIP_MDS_256K | SMFIP_MDS_1M


def max_data_size(protocol: int) -> int:
    """The packet data limit the milter's OPTNEG answer announces (libmilter's MILTER_MDS_*)."""
    if protocol & SMFIP_MDS_1M:
        return 1024 * 1024 - 1
    if protocol & SMFIP_MDS_256K:
        return 256 * 1024 - 1
    return DEFAULT_MAX_DATA


@dataclass(frozen=True)
class WireHeader:
    payload: bytes  # name NUL value NUL
    name: str  # the name as sent (for the log)
    original_size: int  # bytes of name + value before any cut
    truncated: bool


def _utf8_name(name: bytes) -> bytes:
    try:
        name.decode("utf-8")
        return name
    except UnicodeDecodeError:
        return name.decode("latin-1").encode("utf-8")


def _cut(data: bytes, size: int) -> bytes:
    """The first `size` bytes at most, not ending inside a UTF-8 character or a line end."""
    if len(data) <= size:
        return data
    end = max(size, 0)
    for back in range(min(3, end)):  # a UTF-8 character is at most 4 bytes
        if data[end - back - 1] & 0xC0 != 0x80:  # a lead or ASCII byte: start of a char
            lead = data[end - back - 1]
            width = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
            if width > back + 1:  # the character does not fit: drop its start too
                end -= back + 1
            break
    return data[:end].rstrip(b"\r\n")


def wire_header(name: str, value: str, max_data: int) -> WireHeader:
    raw_name = name.encode("utf-8", "surrogateescape")
    raw_value = value.encode("utf-8", "surrogateescape")
    original = len(raw_name) + len(raw_value)
    wire_name = _utf8_name(raw_name.replace(b"\0", b" "))
    wire_value = raw_value.replace(b"\0", b" ")
    room = max_data - 2  # the two NULs
    truncated = len(wire_name) + len(wire_value) > room
    if truncated:
        # A name alone past the limit is a long line without a colon (a continuation
        # line that lost its indentation): keep its start, and no value.
        wire_name = _cut(wire_name, room)
        wire_value = _cut(wire_value, room - len(wire_name))
    return WireHeader(wire_name + b"\0" + wire_value + b"\0",
                      wire_name.decode("utf-8", "replace"), original, truncated)

"""The Sendmail milter protocol (version 6) on the wire: constants and packet codec.

Shared by the MTA's milter client and by tests that check what a milter negotiates as an
MTA sees it. A packet is a 4-byte big-endian length (command byte included), one command
byte, then the command's data.
"""
from __future__ import annotations

import enum
import socket
import struct
from dataclasses import dataclass, field

from .errors import MilterProtocolError

PROTOCOL_VERSION = 6
MAX_PACKET = 1 << 20  # libmilter's own ceiling is about 1 MiB (MILTER_MAX_DATA_SIZE choices)
BODY_CHUNK = 65535


class ActionFlag(enum.IntFlag):
    """SMFIF_*: what a milter may do at end of message."""

    ADDHDRS = 0x01
    CHGBODY = 0x02
    ADDRCPT = 0x04
    DELRCPT = 0x08
    CHGHDRS = 0x10
    QUARANTINE = 0x20
    CHGFROM = 0x40
    ADDRCPT_PAR = 0x80
    SETSYMLIST = 0x100


class ProtocolFlag(enum.IntFlag):
    """SMFIP_*: steps the MTA may skip, or not wait a reply for."""

    NOCONNECT = 0x01
    NOHELO = 0x02
    NOMAIL = 0x04
    NORCPT = 0x08
    NOBODY = 0x10
    NOHDRS = 0x20
    NOEOH = 0x40
    NR_HDR = 0x80
    NOUNKNOWN = 0x100
    NODATA = 0x200
    SKIP = 0x400
    RCPT_REJ = 0x800
    NR_CONN = 0x1000
    NR_HELO = 0x2000
    NR_MAIL = 0x4000
    NR_RCPT = 0x8000
    NR_DATA = 0x10000
    NR_UNKN = 0x20000
    NR_EOH = 0x40000
    NR_BODY = 0x80000
    HDR_LEADSPC = 0x100000


class MacroStage(enum.IntEnum):
    CONNECT = 0
    HELO = 1
    ENVFROM = 2
    ENVRCPT = 3
    DATA = 4
    EOM = 5
    EOH = 6


ALL_ACTIONS = ActionFlag(sum(ActionFlag))
ALL_PROTOCOL = ProtocolFlag(sum(ProtocolFlag))


@dataclass
class OptNeg:
    version: int
    actions: ActionFlag
    protocol: ProtocolFlag
    macros: dict[MacroStage, list[str]] = field(default_factory=dict)

    def encode(self) -> bytes:
        data = struct.pack("!III", self.version, int(self.actions), int(self.protocol))
        for stage, names in self.macros.items():
            data += struct.pack("!I", int(stage)) + " ".join(names).encode("ascii") + b"\0"
        return data

    @classmethod
    def decode(cls, data: bytes) -> "OptNeg":
        if len(data) < 12:
            raise MilterProtocolError(f"OPTNEG is {len(data)} bytes, needs 12")
        version, actions, protocol = struct.unpack("!III", data[:12])
        macros: dict[MacroStage, list[str]] = {}
        rest = data[12:]
        while rest:
            if len(rest) < 5 or b"\0" not in rest[4:]:
                raise MilterProtocolError("truncated macro list in OPTNEG")
            (stage,) = struct.unpack("!I", rest[:4])
            text, _, rest = rest[4:].partition(b"\0")
            try:
                macros[MacroStage(stage)] = text.decode("ascii").split()
            except ValueError:
                raise MilterProtocolError(f"unknown macro stage {stage} in OPTNEG") from None
        return cls(version, ActionFlag(actions), ProtocolFlag(protocol), macros)


def encode_packet(command: bytes, data: bytes = b"") -> bytes:
    if len(command) != 1:
        raise ValueError("a milter command is one byte")
    return struct.pack("!I", len(data) + 1) + command + data


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(size)
        if not chunk:
            raise MilterProtocolError("the milter closed the connection mid-packet")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def read_packet(sock: socket.socket) -> tuple[bytes, bytes]:
    """Read one packet; returns (command byte, data)."""
    (length,) = struct.unpack("!I", _recv_exact(sock, 4))
    if length < 1 or length > MAX_PACKET:
        raise MilterProtocolError(f"bad milter packet length {length}")
    payload = _recv_exact(sock, length)
    return payload[:1], payload[1:]


def negotiate(sock: socket.socket, offer: OptNeg | None = None) -> OptNeg:
    """Send an MTA's OPTNEG and return the milter's answer (what it asks for)."""
    offer = offer or OptNeg(PROTOCOL_VERSION, ALL_ACTIONS, ALL_PROTOCOL)
    sock.sendall(encode_packet(b"O", offer.encode()))
    command, data = read_packet(sock)
    if command != b"O":
        raise MilterProtocolError(f"expected an OPTNEG reply, got {command!r}")
    return OptNeg.decode(data)

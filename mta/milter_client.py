"""The MTA side of the Sendmail milter protocol (version 6): one MilterClient per milter per
SMTP session, driven stage by stage by the MTA.

It negotiates what the milter asks for (skipped stages are not sent, no-reply stages are not
waited for, macro lists the milter names are honoured), sends macros before each command as
Postfix does, sends the body in 65535-byte chunks with CRLF line ends, stops the body when
the milter says skip, keeps waiting on `progress`, and returns end-of-message actions as
milters.core.edits values for the caller to apply.
"""
from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

from milters.core.edits import (AddHeader, AddRecipient, ChangeFrom, ChangeHeader,
                                DeleteRecipient, Edit, Quarantine, ReplaceBody)
from milters.core.errors import MilterProtocolError
from milters.core.milter_protocol import (ALL_ACTIONS, BODY_CHUNK, PROTOCOL_VERSION, MacroStage,
                                          OptNeg, ProtocolFlag, encode_packet, read_packet)
from milters.core.verdict import SmtpReply, Verdict

P = ProtocolFlag
# What our MTA can do: skip any stage, not wait on any, pass rejected recipients, keep
# header leading space. (libmilter refuses to ask for more than the MTA offers.)
OFFERED_PROTOCOL = (P.NOCONNECT | P.NOHELO | P.NOMAIL | P.NORCPT | P.NOBODY | P.NOHDRS
                    | P.NOEOH | P.NOUNKNOWN | P.NODATA | P.SKIP | P.RCPT_REJ | P.NR_CONN
                    | P.NR_HELO | P.NR_MAIL | P.NR_RCPT | P.NR_DATA | P.NR_UNKN | P.NR_EOH
                    | P.NR_BODY | P.NR_HDR | P.HDR_LEADSPC)

# Postfix's replies when a milter rejects or tempfails without a reply text of its own.
DEFAULT_REJECT = SmtpReply(550, "5.7.1", "Command rejected")
DEFAULT_TEMPFAIL = SmtpReply(451, "4.7.1", "Service unavailable - try again later")

_STAGE_COMMAND = {MacroStage.CONNECT: b"C", MacroStage.HELO: b"H", MacroStage.ENVFROM: b"M",
                  MacroStage.ENVRCPT: b"R", MacroStage.DATA: b"T", MacroStage.EOH: b"N",
                  MacroStage.EOM: b"E"}
_FAMILY = {socket.AF_INET: b"4", socket.AF_INET6: b"6", socket.AF_UNIX: b"L"}


@dataclass(frozen=True)
class MilterEndpoint:
    """Where a milter listens, as Postfix writes it, and how long each wait may take."""

    name: str
    socket: str  # inet:127.0.0.1:8891, inet6:[::1]:8891 or unix:/path
    connect_timeout: float = 5.0
    command_timeout: float = 30.0
    eom_timeout: float = 300.0  # content checks (DKIM, conversions) may take a while


@dataclass
class EomOutcome:
    verdict: Verdict
    edits: list[Edit] = field(default_factory=list)


def _cstr(data: bytes) -> list[str]:
    """NUL-terminated strings in a packet, decoded leniently (milters may send 8-bit)."""
    return [part.decode("utf-8", "surrogateescape") for part in data.split(b"\0")[:-1]]


def _z(*parts: str) -> bytes:
    return b"".join(part.encode("utf-8", "surrogateescape") + b"\0" for part in parts)


def open_socket(spec: str, timeout: float) -> socket.socket:
    kind, _, rest = spec.partition(":")
    if kind in ("unix", "local"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(rest)
        return sock
    if kind not in ("inet", "inet6"):
        raise MilterProtocolError(f"milter socket '{spec}': use inet:, inet6: or unix:")
    host, _, port = rest.rpartition(":")
    sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    # Small request/reply packets: without this, Nagle against delayed ACKs stalls ~40 ms.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class MilterClient:
    """One milter, one SMTP session. Methods return the milter's verdict for that stage;
    a stage the milter skipped or does not answer returns CONTINUE at once."""

    def __init__(self, endpoint: MilterEndpoint) -> None:
        self.endpoint = endpoint
        self.sock: socket.socket | None = None
        self.negotiated: OptNeg | None = None
        self.body_skipped = False

    # -- session -------------------------------------------------------------------------
    def open(self) -> OptNeg:
        try:
            self.sock = open_socket(self.endpoint.socket, self.endpoint.connect_timeout)
        except OSError as exc:
            raise MilterProtocolError(f"milter {self.endpoint.name} at {self.endpoint.socket}: "
                                      f"{exc.strerror or exc}") from None
        self._send(b"O", OptNeg(PROTOCOL_VERSION, ALL_ACTIONS, OFFERED_PROTOCOL).encode())
        command, data = self._read(self.endpoint.command_timeout)
        if command != b"O":
            raise MilterProtocolError(f"milter {self.endpoint.name}: expected OPTNEG, got "
                                      f"{command!r}")
        answer = OptNeg.decode(data)
        if answer.version < 2 or int(answer.protocol) & ~int(OFFERED_PROTOCOL):
            raise MilterProtocolError(f"milter {self.endpoint.name} asked for what we did not "
                                      f"offer (version {answer.version}, protocol "
                                      f"{int(answer.protocol):#x})")
        self.negotiated = answer
        return answer

    def close(self) -> None:
        if self.sock is None:
            return
        try:
            self._send(b"Q")
        except OSError:
            pass  # the milter went away first; nothing to tell it
        self.sock.close()
        self.sock = None

    # -- stages --------------------------------------------------------------------------
    def connect(self, hostname: str, address: str | None, port: int = 0,
                family: int = socket.AF_INET, macros: dict[str, str] | None = None) -> Verdict:
        self._macros(MacroStage.CONNECT, macros)
        if address is None or family not in _FAMILY:
            payload = _z(hostname) + b"U"
        else:
            payload = _z(hostname) + _FAMILY[family] + struct.pack("!H", port) + _z(address)
        return self._stage(b"C", payload, P.NOCONNECT, P.NR_CONN)

    def helo(self, name: str, macros: dict[str, str] | None = None) -> Verdict:
        self._macros(MacroStage.HELO, macros)
        return self._stage(b"H", _z(name), P.NOHELO, P.NR_HELO)

    def mail(self, sender: str, params: list[str] = (), macros: dict[str, str] | None = None  # type: ignore[assignment]
             ) -> Verdict:
        self._macros(MacroStage.ENVFROM, macros)
        self.body_skipped = False
        return self._stage(b"M", _z(f"<{sender}>", *params), P.NOMAIL, P.NR_MAIL)

    def rcpt(self, recipient: str, params: list[str] = (),  # type: ignore[assignment]
             macros: dict[str, str] | None = None) -> Verdict:
        self._macros(MacroStage.ENVRCPT, macros)
        return self._stage(b"R", _z(f"<{recipient}>", *params), P.NORCPT, P.NR_RCPT)

    def data(self, macros: dict[str, str] | None = None) -> Verdict:
        self._macros(MacroStage.DATA, macros)
        return self._stage(b"T", b"", P.NODATA, P.NR_DATA)

    def header(self, name: str, value: str) -> Verdict:
        return self._stage(b"L", _z(name, value), P.NOHDRS, P.NR_HDR)

    def end_of_headers(self, macros: dict[str, str] | None = None) -> Verdict:
        self._macros(MacroStage.EOH, macros)
        return self._stage(b"N", b"", P.NOEOH, P.NR_EOH)

    def body(self, body: bytes) -> Verdict:
        """Send the body (CRLF line ends) in 65535-byte chunks, until the milter says skip."""
        for start in range(0, len(body), BODY_CHUNK):
            if self.body_skipped:
                break
            verdict = self._stage(b"B", body[start:start + BODY_CHUNK], P.NOBODY, P.NR_BODY)
            if verdict.ends_transaction:
                return verdict
        return Verdict.cont()

    def end_of_message(self, macros: dict[str, str] | None = None) -> EomOutcome:
        self._macros(MacroStage.EOM, macros)
        self._send(b"E")
        edits: list[Edit] = []
        body_parts: list[bytes] = []
        while True:
            command, data = self._read(self.endpoint.eom_timeout)
            edit = self._edit(command, data, body_parts)
            if edit is not None:
                edits.append(edit)
                continue
            if command == b"b":
                continue
            if body_parts:
                edits.append(ReplaceBody(b"".join(body_parts)))
            return EomOutcome(self._verdict(command, data, "eom"), edits)

    def abort(self) -> None:
        """End the transaction (RSET, a rejected message); the session goes on."""
        self._send(b"A")

    # -- internals -----------------------------------------------------------------------
    def _send(self, command: bytes, data: bytes = b"") -> None:
        if self.sock is None:
            raise MilterProtocolError(f"milter {self.endpoint.name}: not connected")
        try:
            self.sock.sendall(encode_packet(command, data))
        except OSError as exc:
            raise MilterProtocolError(f"milter {self.endpoint.name}: send failed: {exc}") from None

    def _read(self, timeout: float) -> tuple[bytes, bytes]:
        """The next packet other than `progress`, which restarts the timeout."""
        assert self.sock is not None
        while True:
            self.sock.settimeout(timeout)
            try:
                command, data = read_packet(self.sock)
            except socket.timeout:
                raise MilterProtocolError(f"milter {self.endpoint.name}: no reply within "
                                          f"{timeout:g}s") from None
            except OSError as exc:
                raise MilterProtocolError(f"milter {self.endpoint.name}: {exc}") from None
            if command != b"p":
                return command, data

    def _macros(self, stage: MacroStage, values: dict[str, str] | None) -> None:
        if not values or self.negotiated is None:
            return
        wanted = self.negotiated.macros.get(stage)
        if wanted is not None:  # the milter named the macros it wants at this stage
            values = {name: value for name, value in values.items()
                      if name in wanted or name.strip("{}") in wanted}
        if values:
            self._send(b"D", _STAGE_COMMAND[stage] + _z(*[x for kv in values.items() for x in kv]))

    def _stage(self, command: bytes, payload: bytes, skip: ProtocolFlag,
               no_reply: ProtocolFlag) -> Verdict:
        assert self.negotiated is not None, "open() first"
        protocol = self.negotiated.protocol
        if protocol & skip:
            return Verdict.cont()
        self._send(command, payload)
        if protocol & no_reply:
            return Verdict.cont()
        reply, data = self._read(self.endpoint.command_timeout)
        return self._verdict(reply, data, command.decode())

    def _verdict(self, command: bytes, data: bytes, stage: str) -> Verdict:
        if command == b"c":
            return Verdict.cont()
        if command == b"s":
            self.body_skipped = True
            return Verdict.cont("skip")
        if command == b"a":
            return Verdict.accept()
        if command == b"d":
            return Verdict.discard()
        if command == b"r":
            return Verdict.reject(DEFAULT_REJECT)
        if command in (b"t", b"4", b"f"):  # tempfail, shutdown, connection failure
            return Verdict.tempfail(DEFAULT_TEMPFAIL)
        if command == b"y":
            return self._reply_code(data)
        raise MilterProtocolError(f"milter {self.endpoint.name}: unexpected reply {command!r} "
                                  f"at {stage}")

    def _reply_code(self, data: bytes) -> Verdict:
        text = data.rstrip(b"\0").decode("utf-8", "replace")
        # A multi-line reply arrives as "550-5.7.1 first\r\n550 5.7.1 last"; keep the last.
        last = text.replace("\r\n", "\n").split("\n")[-1]
        try:
            reply = SmtpReply.parse(last.replace("-", " ", 1) if last[3:4] == "-" else last)
        except ValueError:
            raise MilterProtocolError(f"milter {self.endpoint.name}: bad reply code {text!r}"
                                      ) from None
        if reply.is_temporary:
            return Verdict.tempfail(reply)
        if reply.is_permanent:
            return Verdict.reject(reply)
        raise MilterProtocolError(f"milter {self.endpoint.name}: reply code {reply.code} is "
                                  "neither 4xx nor 5xx")

    def _edit(self, command: bytes, data: bytes, body_parts: list[bytes]) -> Edit | None:
        """Decode one end-of-message action; None when `command` is not one."""
        if command == b"b":
            body_parts.append(data)
            return None
        if command == b"h":
            name, value = _cstr(data)[:2]
            return AddHeader(name, value)
        if command in (b"i", b"m"):
            (index,) = struct.unpack("!I", data[:4])
            name, value = _cstr(data[4:])[:2]
            return (AddHeader(name, value, index) if command == b"i"
                    else ChangeHeader(name, index, value))
        if command == b"+":
            return AddRecipient(strip_angle(_cstr(data)[0]))
        if command == b"2":
            parts = _cstr(data)
            return AddRecipient(strip_angle(parts[0]), parts[1] if len(parts) > 1 else None)
        if command == b"-":
            return DeleteRecipient(strip_angle(_cstr(data)[0]))
        if command == b"e":
            parts = _cstr(data)
            return ChangeFrom(strip_angle(parts[0]), parts[1] if len(parts) > 1 else None)
        if command == b"q":
            return Quarantine(_cstr(data)[0] if data else "")
        return None


def strip_angle(address: str) -> str:
    address = address.strip()
    return address[1:-1] if address.startswith("<") and address.endswith(">") else address

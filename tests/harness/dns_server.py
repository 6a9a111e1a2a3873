"""DNS servers on loopback for SPF/DKIM/DMARC tests.

    with KnotServer({"example.test": ['@ 300 IN TXT "v=spf1 -all"']}, tmp_path) as dns:
        resolver.nameservers = [dns.address]          # port 53 on 127.X.Y.Z
        dns.set_records("example.test", [...])         # served once this returns

KnotServer runs the real Knot DNS (knotd) in the foreground, authoritative
for the given zones. SilentDnsServer and GarbageDnsServer are tiny Python
servers that misbehave on purpose (no answer; an unparsable answer).

Every server binds UDP and TCP port 53 on a random 127.X.Y.Z (any 127/8
address is local on Linux): OpenDMARC and glibc can only reach port 53, and a
fresh address per server keeps parallel runs apart. Port 53 needs root.

Knot DNS quirks this harness works around (knotd 3.2, Debian 12):
- Everything knotd writes (rundir, timer DB, zone files) is configured under
  `workdir`; without `database.storage` it would use /var/lib/knot.
- Its control socket lives in rundir; AF_UNIX paths are limited to 107
  bytes, so a long pytest tmp_path gets a short rundir under /tmp instead.
- knotd exits 1 with "cannot bind address ... (address already in use)" when
  the address is taken (it uses SO_REUSEPORT for UDP, so our own probe binds
  without it to see a knotd that holds the address); we then pick another.
- A zone that fails to load is simply not served (REFUSED), so a syntax error
  would look like a slow start: start() checks the log for load errors, and
  set_records() uses `knotc -b zone-reload`, which reports the failure (the
  old zone stays in service).
- `zonefile-sync: -1` and `journal-content: none` keep knotd from writing
  our zone files back or keeping history across reloads.
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import grp
import os
import pwd
import random
import selectors
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

KNOTD = "/usr/sbin/knotd"
KNOTC = "/usr/sbin/knotc"
DNS_PORT = 53

# Out-of-zone NS target: needs no glue and never clashes with a test's names.
_NS_NAME = "ns.knot-harness.invalid."
_HOSTMASTER = "hostmaster.knot-harness.invalid."
# SOA minimum of 1 s: resolvers inside daemons (libunbound in OpenDKIM) cache
# NXDOMAIN for that long, so a name added by set_records() shows up at once.
_SOA_TIMERS = "60 60 600 1"
_MAX_UNIX_PATH = 100


class DnsHarnessError(RuntimeError):
    """A test DNS server did not start or misbehaved; the message carries its log tail."""


def random_loopback_address() -> str:
    """127.X.Y.Z with X, Y, Z in 1..254: never 127.0.0.1, rarely anybody else's."""
    return "127." + ".".join(str(random.randint(1, 254)) for _ in range(3))


def address_is_free(address: str, port: int = DNS_PORT) -> bool:
    """True if both UDP and TCP address:port can be bound right now."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            if kind == socket.SOCK_STREAM:
                # A TIME_WAIT left by an earlier server must not count as "taken".
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((address, port))
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                    return False
                raise
    return True


def pick_loopback_address(port: int = DNS_PORT, attempts: int = 50) -> str:
    """A random 127.X.Y.Z where nothing is bound to UDP or TCP `port`."""
    for _ in range(attempts):
        address = random_loopback_address()
        if address_is_free(address, port):
            return address
    raise DnsHarnessError(f"no free loopback address for port {port} in {attempts} tries")


def _normalize_zone(zone: str) -> str:
    return zone.strip().rstrip(".").lower()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _current_user_group() -> str:
    """knotd's `user:` setting for whoever runs the tests (root:root here)."""
    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    return f"{user}:{group}"


# Live servers, stopped at interpreter exit if a test run dies half-way.
_LIVE: set[KnotServer] = set()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.stop()


class KnotServer:
    """knotd authoritative for `zones`, on address:53 (UDP and TCP)."""

    def __init__(self, zones: Mapping[str, Iterable[str]], workdir: Path,
                 address: str | None = None, port: int = DNS_PORT,
                 start_timeout: float = 10.0) -> None:
        if not zones:
            raise ValueError("KnotServer needs at least one zone")
        self.zones: dict[str, list[str]] = {
            _normalize_zone(origin): list(records) for origin, records in zones.items()}
        self.workdir = Path(workdir).resolve() / "knot"
        self._requested_address = address
        self.address = address or ""
        self.port = port
        self.start_timeout = start_timeout
        self._serials = {zone: 0 for zone in self.zones}
        self._proc: subprocess.Popen[bytes] | None = None
        self._rundir: Path | None = None
        self._own_rundir = False

    # -- paths -----------------------------------------------------------------

    @property
    def nameserver(self) -> str:
        """"127.X.Y.Z:53", for configs that take address:port."""
        return f"{self.address}:{self.port}"

    @property
    def conf_path(self) -> Path:
        return self.workdir / "knot.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "knotd.log"

    @property
    def zone_dir(self) -> Path:
        return self.workdir / "zones"

    def zone_file(self, zone: str) -> Path:
        return self.zone_dir / f"{_normalize_zone(zone)}.zone"

    @property
    def control_socket(self) -> Path:
        assert self._rundir is not None, "not started"
        return self._rundir / "knot.sock"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return _tail(self.log_path, lines)

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(offset)
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    # -- configuration ---------------------------------------------------------

    def _zone_text(self, zone: str) -> str:
        header = [
            f"$ORIGIN {zone}.",
            "$TTL 300",
            f"@ 300 IN SOA {_NS_NAME} {_HOSTMASTER} {self._serials[zone]} {_SOA_TIMERS}",
            f"@ 300 IN NS {_NS_NAME}",
        ]
        return "\n".join(header + self.zones[zone]) + "\n"

    def _write_zone(self, zone: str) -> None:
        # Write then rename, so knotd never parses a half-written file.
        path = self.zone_file(zone)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self._zone_text(zone))
        os.replace(tmp, path)

    def _write_config(self) -> None:
        assert self._rundir is not None
        zones = "\n".join(f"  - domain: {zone}" for zone in self.zones)
        self.conf_path.write_text(f"""\
# Written by tests/harness/dns_server.py; nothing here touches /var/lib/knot.
server:
    rundir: "{self._rundir}"
    user: {_current_user_group()}
    listen: [ "{self.address}@{self.port}" ]
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
log:
  - target: stderr
    any: info
database:
    storage: "{self.workdir / 'storage'}"
control:
    listen: "{self._rundir / 'knot.sock'}"
template:
  - id: default
    storage: "{self.zone_dir}"
    file: "%s.zone"
    zonefile-load: whole
    zonefile-sync: -1
    journal-content: none
    semantic-checks: off
zone:
{zones}
""")

    def _prepare_rundir(self) -> None:
        rundir = self.workdir / "run"
        if len(str(rundir / "knot.sock")) > _MAX_UNIX_PATH:
            self._rundir = Path(tempfile.mkdtemp(prefix="knot-run-"))
            self._own_rundir = True
        else:
            rundir.mkdir(exist_ok=True)
            self._rundir = rundir
            self._own_rundir = False

    # -- life cycle ------------------------------------------------------------

    def start(self) -> KnotServer:
        if self._proc is not None:
            raise RuntimeError("KnotServer already started")
        for sub in ("zones", "storage"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self._prepare_rundir()
        for zone in self.zones:
            self._serials[zone] += 1
            self._write_zone(zone)
        _LIVE.add(self)
        try:
            for _ in range(5):
                if self._requested_address is None:
                    self.address = pick_loopback_address(self.port)
                elif not address_is_free(self.address, self.port):
                    raise DnsHarnessError(f"{self.nameserver} is already in use")
                if self._launch():
                    return self
            raise DnsHarnessError(f"knotd lost the race for a free address 5 times;"
                                  f" log tail:\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _launch(self) -> bool:
        """Start knotd and wait for every zone; False if the address was taken meanwhile."""
        self._write_config()
        offset = self._log_size()
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen([KNOTD, "-c", str(self.conf_path)],
                                          stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout
        pending = set(self.zones)
        while pending:
            if self._proc.poll() is not None:
                self._proc = None
                if ("address already in use" in self._log_since(offset)
                        and self._requested_address is None):
                    return False
                raise DnsHarnessError(f"knotd exited during start; log tail:\n{self.log_tail()}")
            if "failed to load zone" in self._log_since(offset):
                raise DnsHarnessError(f"knotd could not load a zone; log tail:\n{self.log_tail()}")
            pending = {zone for zone in pending if self.soa_serial(zone) != self._serials[zone]}
            if not pending:
                break
            if time.monotonic() >= deadline:
                raise DnsHarnessError(
                    f"knotd did not serve {sorted(pending)} on {self.nameserver} within"
                    f" {self.start_timeout:.1f}s; log tail:\n{self.log_tail()}")
            time.sleep(0.02)
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM knotd and wait for it (SIGKILL after `timeout`)."""
        _LIVE.discard(self)
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._own_rundir and self._rundir is not None:
            shutil.rmtree(self._rundir, ignore_errors=True)
            self._own_rundir = False

    def __enter__(self) -> KnotServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- queries ---------------------------------------------------------------

    def query(self, qname: str, rdtype: str | int = "A", *, tcp: bool = False,
              timeout: float = 2.0) -> dns.message.Message:
        """Ask this server directly (dnspython); raises dns.exception.Timeout etc."""
        request = dns.message.make_query(qname, rdtype)
        if tcp:
            return dns.query.tcp(request, self.address, timeout=timeout, port=self.port)
        return dns.query.udp(request, self.address, timeout=timeout, port=self.port)

    def soa_serial(self, zone: str, timeout: float = 0.2) -> int | None:
        """The serial knotd serves for `zone`, or None if it does not (yet) serve it."""
        try:
            reply = self.query(f"{_normalize_zone(zone)}.", "SOA", timeout=timeout)
        except (dns.exception.DNSException, OSError):
            return None
        if reply.rcode() != dns.rcode.NOERROR:
            return None
        for rrset in reply.answer:
            if rrset.rdtype == dns.rdatatype.SOA:
                return int(rrset[0].serial)
        return None

    # -- changes ---------------------------------------------------------------

    def set_records(self, zone: str, records: Iterable[str], timeout: float = 5.0) -> None:
        """Replace `zone`'s records (SOA/NS are added); returns once knotd serves them."""
        zone = _normalize_zone(zone)
        if zone not in self.zones:
            raise KeyError(f"{zone} is not one of this server's zones: {sorted(self.zones)}")
        if self._proc is None:
            raise RuntimeError("KnotServer not started")
        previous, self.zones[zone] = self.zones[zone], list(records)
        self._serials[zone] += 1
        self._write_zone(zone)
        # -b: wait for the load event, so a zone file error comes back as a failure.
        proc = subprocess.run(
            [KNOTC, "-c", str(self.conf_path), "-s", str(self.control_socket), "-b",
             "-t", str(max(1, int(timeout))), "zone-reload", f"{zone}."],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout + 5, check=False)
        if proc.returncode != 0:
            # knotd keeps serving the old zone; keep our view (and the file) in step.
            self.zones[zone] = previous
            self._write_zone(zone)
            raise DnsHarnessError(
                f"knotc zone-reload {zone} exited {proc.returncode}:"
                f" {(proc.stdout + proc.stderr).decode(errors='replace').strip()};"
                f" log tail:\n{self.log_tail()}")
        deadline = time.monotonic() + timeout
        while self.soa_serial(zone) != self._serials[zone]:
            if time.monotonic() >= deadline:
                raise DnsHarnessError(f"{zone} not at serial {self._serials[zone]} after"
                                      f" {timeout:.1f}s; log tail:\n{self.log_tail()}")
            time.sleep(0.02)


class _MisbehavingDnsServer:
    """UDP and TCP on address:53, one thread; subclasses decide what (if anything) to send."""

    def __init__(self, address: str | None = None, port: int = DNS_PORT) -> None:
        self._requested_address = address
        self.address = address or ""
        self.port = port
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._queries: list[bytes] = []

    @property
    def nameserver(self) -> str:
        return f"{self.address}:{self.port}"

    @property
    def queries(self) -> list[bytes]:
        """Every query received so far (UDP payloads and TCP messages, without framing)."""
        with self._lock:
            return list(self._queries)

    def reply(self, query: bytes) -> bytes | None:
        """What to send back for one query; None sends nothing."""
        raise NotImplementedError

    def start(self) -> Self:
        for _ in range(20):
            if self._requested_address is None:
                self.address = random_loopback_address()
            try:
                self._bind()
                break
            except OSError as exc:
                self._close_sockets()
                if exc.errno != errno.EADDRINUSE or self._requested_address is not None:
                    raise
        else:
            raise DnsHarnessError("no free loopback address for a misbehaving DNS server")
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name=type(self).__name__,
                                        daemon=True)
        self._thread.start()
        return self

    def _bind(self) -> None:
        self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._udp.bind((self.address, self.port))
        self._tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._tcp.bind((self.address, self.port))
        self._tcp.listen(16)
        self._udp.setblocking(False)
        self._tcp.setblocking(False)

    def _close_sockets(self) -> None:
        for sock in (self._udp, self._tcp):
            if sock is not None:
                sock.close()
        self._udp = self._tcp = None

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        self._close_sockets()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _record(self, query: bytes) -> bytes | None:
        with self._lock:
            self._queries.append(query)
        return self.reply(query)

    def _serve(self) -> None:
        assert self._udp is not None and self._tcp is not None
        sel = selectors.DefaultSelector()
        sel.register(self._udp, selectors.EVENT_READ, "udp")
        sel.register(self._tcp, selectors.EVENT_READ, "listen")
        buffers: dict[socket.socket, bytearray] = {}
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=0.05):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    with contextlib.suppress(BlockingIOError, ConnectionError):
                        if key.data == "udp":
                            data, peer = sock.recvfrom(65535)
                            answer = self._record(data)
                            if answer is not None:
                                sock.sendto(answer, peer)
                        elif key.data == "listen":
                            conn, _ = sock.accept()
                            conn.setblocking(False)
                            buffers[conn] = bytearray()
                            sel.register(conn, selectors.EVENT_READ, "conn")
                        else:
                            self._on_tcp_data(sock, buffers, sel)
        finally:
            for conn in buffers:
                conn.close()
            sel.close()

    def _on_tcp_data(self, conn: socket.socket, buffers: dict[socket.socket, bytearray],
                     sel: selectors.BaseSelector) -> None:
        chunk = conn.recv(65535)
        if not chunk:
            sel.unregister(conn)
            buffers.pop(conn, None)
            conn.close()
            return
        buf = buffers[conn]
        buf += chunk
        # DNS over TCP: each message is preceded by its length (2 bytes, network order).
        while len(buf) >= 2 and len(buf) >= 2 + int.from_bytes(buf[:2], "big"):
            size = int.from_bytes(buf[:2], "big")
            message = bytes(buf[2:2 + size])
            del buf[:2 + size]
            answer = self._record(message)
            if answer is not None:
                conn.setblocking(True)
                conn.sendall(len(answer).to_bytes(2, "big") + answer)
                conn.setblocking(False)


class SilentDnsServer(_MisbehavingDnsServer):
    """Reads every query and never answers: clients run into their timeout.

    TCP connections are accepted and kept open without a reply.
    """

    def reply(self, query: bytes) -> bytes | None:
        return None


class GarbageDnsServer(_MisbehavingDnsServer):
    """Answers every query with bytes that are no DNS message, but carry the query's ID.

    Default: a plausible response header (QR set, NOERROR, one question and
    one answer announced) followed by a name whose label runs past the end,
    so a client gets past the ID and header checks and fails in parsing
    (dnspython: dns.exception.FormError). short=True sends the ID and a few
    random bytes, shorter than a DNS header (dnspython: dns.message.ShortHeader,
    also a FormError).
    """

    def __init__(self, address: str | None = None, port: int = DNS_PORT, *,
                 short: bool = False) -> None:
        super().__init__(address, port)
        self.short = short

    def reply(self, query: bytes) -> bytes | None:
        if len(query) < 2:
            return None
        qid = query[:2]
        if self.short:
            return qid + os.urandom(6)
        # flags 0x8180: response, RD, RA, NOERROR; counts QD=1 AN=1 NS=0 AR=0.
        header = qid + bytes.fromhex("8180 0001 0001 0000 0000".replace(" ", ""))
        # A 63-byte label announced, only 5 bytes present.
        return header + b"\x3f" + os.urandom(5)

"""Debian's OpenDMARC and OpenDKIM (verifier) as milters whose DNS is a test server.

    with KnotServer(zones, tmp_path) as dns, OpenDmarc(dns, tmp_path) as dmarc, \\
            PostfixInstance(relay_port=sink.port, smtpd_milters=dmarc.socket_spec) as pf:
        ...

Both daemons run in the foreground (-f) inside isolated_argv(), so the
system resolver they use reads a resolv.conf naming only the test server.

OpenDMARC (1.4.2) findings:
- It ignores connections from IgnoreHosts, which defaults to 127.0.0.1:
  Postfix on loopback is exactly that, so we always write an IgnoreHosts file
  (with `ignore_hosts`, or a TEST-NET address nobody uses).
- SPFSelfValidate makes it check SPF itself (libspf2, through the system
  resolver); SPFIgnoreResults makes it ignore SPF results in the header.
- libspf2 passes SPF for a loopback client whatever the record says
  ("localhost" shortcut), so mail from 127.0.0.1 always gets spf=pass. To see
  spf=fail, send with XCLIENT ADDR=<TEST-NET address> (swaks.py xclient_addr);
  Postfix hands the XCLIENT address to the milter.
- It adds two headers: "<authserv-id>; dmarc=pass (p=reject dis=none)
  header.from=<domain>" and "<authserv-id>; spf=pass smtp.mailfrom=<domain>".
  RejectFailures answers "550 5.7.1 rejected by DMARC policy for <domain>".
- Run as root it needs no UserID; files then need no special modes.
- With Syslog false it logs nothing; stderr is captured for error messages.
- The milter is ready once its own socket is in LISTEN; we check /proc
  instead of connecting, since a probe would be a milter session. When bind()
  fails, libmilter only says "smfi_opensocket() failed" (exit 69).
- On SIGTERM libmilter daemons take ~5 s to exit (the listener notices the
  stop flag only when its poll times out); stop() connects to wake it.

OpenDKIM (2.11) findings:
- Debian builds it with libunbound, which resolves recursively from the root
  and never reads /etc/resolv.conf; isolated_argv() alone does not reach the
  test server. We give it an unbound config (ResolverConfiguration) that
  forwards everything to the test server, with do-not-query-localhost: no,
  since unbound refuses to send queries to 127.0.0.0/8 by default.
- libunbound serves the RFC 6761 names itself: any *.test name is NXDOMAIN
  without a packet sent (opendkim says "key not found in DNS") until the
  config says `local-zone: "test." nodefault`.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.harness.dns_server import KnotServer
from tests.harness.isolated import isolated_argv
from tests.harness.ports import LOOPBACK, free_port

OPENDMARC = "/usr/sbin/opendmarc"
OPENDKIM = "/usr/sbin/opendkim"

# An address no test connects from: replaces OpenDMARC's default (127.0.0.1).
_NOBODY = "192.0.2.254"


def _listening_inode(host: str, port: int) -> str | None:
    """Socket inode of the TCP listener on host:port (IPv4), from /proc/net/tcp."""
    # The kernel prints the address as a native-endian u32 of the network-order bytes.
    wanted = f"{int.from_bytes(socket.inet_aton(host), sys.byteorder):08X}:{port:04X}"
    with open("/proc/net/tcp") as fh:
        next(fh, None)  # header
        for line in fh:
            fields = line.split()
            # fields[1] local address, fields[3] state (0A = LISTEN), fields[9] inode.
            if len(fields) > 9 and fields[1] == wanted and fields[3] == "0A":
                return fields[9]
    return None


def _pid_listens(pid: int, host: str, port: int) -> bool:
    """True if process `pid` itself holds the listener on host:port.

    Seeing LISTEN is not enough: after a lost free_port() race, that socket
    belongs to someone else while our daemon is failing to bind.
    """
    inode = _listening_inode(host, port)
    if inode is None:
        return False
    target = f"socket:[{inode}]"
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return True
    return False


def _pid_listens_unix(pid: int, path: Path) -> bool:
    """True if process `pid` holds a listening unix socket bound to `path` (/proc/net/unix:
    flag 00010000 is __SO_ACCEPTCON), so a stale socket file cannot fool us."""
    inodes = set()
    with open("/proc/net/unix") as fh:
        next(fh, None)  # header
        for line in fh:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == str(path) and int(fields[3], 16) & 0x10000:
                inodes.add(f"socket:[{fields[6]}]")
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return True
    return False


class MilterDaemonError(RuntimeError):
    """The daemon did not start or died; the message carries its output tail."""


def _flag(value: bool) -> str:
    return "true" if value else "false"


def _nameserver_of(dns: KnotServer | str) -> tuple[str, int]:
    """(ip, port) of the test DNS server; a plain IP means port 53."""
    if isinstance(dns, KnotServer):
        return dns.address, dns.port
    return dns, 53


class _MilterDaemon:
    """A libmilter daemon in the foreground on 127.0.0.1:<free port> (or on the unix socket
    `unix_path`: over TCP, Nagle against delayed ACKs can cost a milter round trip 40 ms),
    DNS isolated."""

    name = "milter"

    def __init__(self, dns: KnotServer | str, workdir: Path, *,
                 extra: Mapping[str, str] | None = None, start_timeout: float = 10.0,
                 unix_path: Path | None = None) -> None:
        self.unix_path = unix_path
        self.nameserver, self.dns_port = _nameserver_of(dns)
        self.workdir = Path(workdir).resolve() / self.name
        self.extra = dict(extra or {})
        self.start_timeout = start_timeout
        self.host = LOOPBACK
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    # -- specs and paths ---------------------------------------------------------

    @property
    def socket_spec(self) -> str:
        """Postfix syntax (smtpd_milters), e.g. inet:127.0.0.1:8893."""
        return f"unix:{self.unix_path}" if self.unix_path else f"inet:{self.host}:{self.port}"

    @property
    def milter_socket(self) -> str:
        """libmilter syntax (its Socket setting), e.g. inet:8893@127.0.0.1."""
        return f"local:{self.unix_path}" if self.unix_path else f"inet:{self.port}@{self.host}"

    @property
    def pid(self) -> int:
        assert self._proc is not None, "not started"
        return self._proc.pid

    @property
    def conf_path(self) -> Path:
        return self.workdir / f"{self.name}.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # -- subclass hooks --------------------------------------------------------

    def config_lines(self) -> dict[str, str]:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def _write_config(self) -> None:
        settings = self.config_lines()
        if self.unix_path:
            # smtpd connects as user postfix; root's 022 would leave it no write permission
            # (UMask 0: whether the daemon reads the value as octal is not documented).
            settings["UMask"] = "0"
        settings.update(self.extra)
        text = "".join(f"{key} {value}\n" for key, value in settings.items())
        self.conf_path.write_text(f"# Written by tests/harness/opendmarc.py\n{text}")

    # -- life cycle ------------------------------------------------------------

    def start(self) -> Self:
        if self._proc is not None:
            raise RuntimeError(f"{self.name} already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            # free_port() races with other processes: retry when bind() loses.
            for _ in range(4):
                self.port = free_port()
                self._write_config()
                if self._launch():
                    return self
            raise MilterDaemonError(f"{self.name} could not open its socket 4 times;"
                                    f" output tail:\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _launch(self) -> bool:
        """Start the daemon, wait for LISTEN; False if the port was taken meanwhile."""
        offset = len(self.log_text())
        if self.unix_path:
            with contextlib.suppress(FileNotFoundError):
                self.unix_path.unlink()  # a leftover would make libmilter's bind fail
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                isolated_argv(self.command(), self.nameserver, self.workdir),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout
        while not self._listening(self._proc.pid):
            if self._proc.poll() is not None:
                rc, self._proc = self._proc.returncode, None
                # libmilter says only this when bind() fails; a lost free_port() race
                # is the usual cause, and a persistent error still ends in an exception.
                if "smfi_opensocket() failed" in self.log_text()[offset:]:
                    return False
                raise MilterDaemonError(f"{self.name} exited {rc} during start;"
                                        f" output tail:\n{self.log_tail()}")
            if time.monotonic() >= deadline:
                raise MilterDaemonError(f"{self.name} not listening on {self.host}:{self.port}"
                                        f" after {self.start_timeout:.1f}s;"
                                        f" output tail:\n{self.log_tail()}")
            time.sleep(0.02)
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then wake the listener until the daemon exits (SIGKILL after `timeout`)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # libmilter's listener polls in 5 s steps and only then sees the stop
            # flag; a connection wakes it at once (an empty session, harmless).
            self._wake()
            try:
                proc.wait(0.1)
                return
            except subprocess.TimeoutExpired:
                pass
        proc.kill()
        proc.wait()

    def _listening(self, pid: int) -> bool:
        if self.unix_path:
            return _pid_listens_unix(pid, self.unix_path)
        return _pid_listens(pid, self.host, self.port)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            if self.unix_path:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as wake:
                    wake.settimeout(0.2)
                    wake.connect(str(self.unix_path))
            else:
                socket.create_connection((self.host, self.port), timeout=0.2).close()

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class OpenDmarc(_MilterDaemon):
    """opendmarc -f -c CONF, checking SPF itself; its DNS is `dns` (a KnotServer or an IP)."""

    name = "opendmarc"

    def __init__(self, dns: KnotServer | str, workdir: Path, *,
                 authserv_id: str = "mx.test", reject_failures: bool = False,
                 trusted_authserv_ids: Sequence[str] | None = None,
                 spf_self_validate: bool = True, spf_ignore_results: bool = True,
                 ignore_authenticated_clients: bool = False,
                 ignore_hosts: Sequence[str] = (),
                 public_suffix_list: Path | None = None,
                 history_file: Path | None = None,
                 extra: Mapping[str, str] | None = None,
                 start_timeout: float = 10.0, unix_path: Path | None = None) -> None:
        super().__init__(dns, workdir, extra=extra, start_timeout=start_timeout,
                         unix_path=unix_path)
        self.authserv_id = authserv_id
        self.reject_failures = reject_failures
        self.trusted_authserv_ids = list(trusted_authserv_ids or [authserv_id])
        self.spf_self_validate = spf_self_validate
        self.spf_ignore_results = spf_ignore_results
        self.ignore_authenticated_clients = ignore_authenticated_clients
        self.ignore_hosts = list(ignore_hosts)
        self.public_suffix_list = public_suffix_list
        self.history_file = history_file

    def config_lines(self) -> dict[str, str]:
        ignore = self.workdir / "ignore.hosts"
        ignore.write_text("".join(f"{host}\n" for host in self.ignore_hosts or [_NOBODY]))
        lines = {
            "Socket": self.milter_socket,
            "PidFile": str(self.workdir / "opendmarc.pid"),
            "AuthservID": self.authserv_id,
            "TrustedAuthservIDs": ",".join(self.trusted_authserv_ids),
            "SPFSelfValidate": _flag(self.spf_self_validate),
            "SPFIgnoreResults": _flag(self.spf_ignore_results),
            "RejectFailures": _flag(self.reject_failures),
            "IgnoreAuthenticatedClients": _flag(self.ignore_authenticated_clients),
            "IgnoreHosts": str(ignore),
            "Syslog": "false",
            "SoftwareHeader": "false",
        }
        if self.public_suffix_list is not None:
            lines["PublicSuffixList"] = str(self.public_suffix_list)
        if self.history_file is not None:
            lines["HistoryFile"] = str(self.history_file)
        return lines

    def command(self) -> list[str]:
        return [OPENDMARC, "-f", "-c", str(self.conf_path)]


class OpenDkimVerifier(_MilterDaemon):
    """opendkim -f -x CONF in verify mode (Mode v); key lookups go to `dns`."""

    name = "opendkim"

    def __init__(self, dns: KnotServer | str, workdir: Path, *,
                 authserv_id: str = "mx.test", extra: Mapping[str, str] | None = None,
                 start_timeout: float = 10.0, unix_path: Path | None = None) -> None:
        super().__init__(dns, workdir, extra=extra, start_timeout=start_timeout,
                         unix_path=unix_path)
        self.authserv_id = authserv_id

    def _write_unbound_config(self) -> Path:
        path = self.workdir / "unbound.conf"
        path.write_text(f"""\
# libunbound inside opendkim: forward every query to the test server.
server:
    do-not-query-localhost: no
    # unbound answers NXDOMAIN itself for the RFC 6761 names our tests use.
    local-zone: "test." nodefault
    local-zone: "invalid." nodefault
forward-zone:
    name: "."
    forward-addr: {self.nameserver}@{self.dns_port}
""")
        return path

    def config_lines(self) -> dict[str, str]:
        return {
            "Socket": self.milter_socket,
            "PidFile": str(self.workdir / "opendkim.pid"),
            "Mode": "v",
            "AuthservID": self.authserv_id,
            "AlwaysAddARHeader": "yes",
            "ResolverConfiguration": str(self._write_unbound_config()),
            "Syslog": "no",
        }

    def command(self) -> list[str]:
        return [OPENDKIM, "-f", "-x", str(self.conf_path)]

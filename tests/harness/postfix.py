"""A private Postfix instance on 127.0.0.1 for integration tests.

    with SmtpSink() as sink, PostfixInstance(relay_port=sink.port,
                                             smtpd_milters="inet:127.0.0.1:9000") as pf:
        run_swaks(pf.smtp_port, mail_from=..., rcpt=...)
        pf.wait_for_log(r"status=sent")

Everything lives under one temp directory (config, queue, data, maillog);
/etc/postfix and the system instance are never written to. Must run as root:
master(8) starts as root and drops to mail_owner (postfix) per daemon.

Postfix quirks this harness works around (Postfix 3.7, Debian 12):
- The postfix command chdir()s into queue_directory first thing, so that
  directory must exist before `postfix start` ("fatal: chdir(...)").
- data_directory must belong to mail_owner or master cannot create
  master.lock ("cannot create file exclusively: Permission denied"). We let
  `postfix start` create it (post-install create-missing, as part of its
  check-fatal step) together with the queue tree, instead of mkdir-ing them.
- maillog_file must start with one of maillog_file_prefixes (default
  "/var, /dev/stdout"), and master.cf must define the `postlog unix-dgram`
  service, or start fails.
- Postfix commands print fatal errors on stderr only when stderr is a tty;
  otherwise the reason goes to the log alone (or nowhere, when the log itself
  is the problem). Admin commands therefore run with a pty as stdout/stderr.
- Daemon command lines do not name the config directory, so `pgrep -f DIR`
  finds nothing; every process of the instance has MAIL_CONFIG=DIR in its
  environment, which is how pids() recognises them.
- On SIGTERM, master kills its process group and exits; the orphans are
  reaped by PID 1, which here takes about a second, so zombies count as gone.
- Postfix naps (300 ms at a time, up to ~2 s) before using a main.cf whose
  mtime is less than a second or two old, so that it never reads a file being
  written; after each write (ours or postconf -e) we backdate the mtime.
- `postfix stop` polls in 1 s steps; signalling master ourselves (what
  postfix-script does) stops the instance in tens of milliseconds.
- smtpd runs as user postfix: unix-socket milters must sit in a directory
  postfix can search (pytest's /tmp/pytest-of-root is 0700) and the socket
  must be writable by postfix; `socket_dir` is such a directory (0755), the
  milter must still chmod its socket (e.g. 0o666).
- An XCLIENT address outside mynetworks is an outside client: RCPT gets
  "454 Relay access denied" unless the domain is in relay_domains (relay
  domains still go to relayhost). XCLIENT without NAME keeps the real peer's
  name (client=localhost[192.0.2.10]); swaks.py sends NAME=[UNAVAILABLE].
- Readiness is checked in /proc/net/tcp, not by connecting: a probe would be
  an smtpd session, and with smtpd_milters a milter session too.
- Milter down: with milter_default_action=tempfail smtpd still greets 220 and
  answers EHLO 250, then MAIL FROM gets "451 4.7.1 Service unavailable - try
  again later" (smtpd_delay_reject); with reject, the banner itself is
  "554 <myhostname> ESMTP not accepting connections".
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from tests.harness.ports import LOOPBACK, free_port, wait_for_listen

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"
POSTQUEUE = "/usr/sbin/postqueue"

# Domains a client outside mynetworks (an XCLIENT address such as 192.0.2.10)
# may send to; without this Postfix answers RCPT with "454 Relay access denied".
DEFAULT_RELAY_DOMAINS = "example.com, example.net, example.org, example.jp, mailmoat.test"

# master.cf from scratch: no chroot (column 5 = n), only the services a relay needs.
# postlog is required once maillog_file is set; it must be unix-dgram, limit 1.
_MASTER_CF = """\
# Private test instance written by tests/harness/postfix.py.
# service       type       private unpriv chroot wakeup maxproc command
{listen}        inet       n       -      n      -      -       smtpd
pickup          unix       n       -      n      60     1       pickup
cleanup         unix       n       -      n      -      0       cleanup
qmgr            unix       n       -      n      300    1       qmgr
rewrite         unix       -       -      n      -      -       trivial-rewrite
bounce          unix       -       -      n      -      0       bounce
defer           unix       -       -      n      -      0       bounce
trace           unix       -       -      n      -      0       bounce
verify          unix       -       -      n      -      1       verify
flush           unix       n       -      n      1000?  0       flush
proxymap        unix       -       -      n      -      -       proxymap
proxywrite      unix       -       -      n      -      1       proxymap
smtp            unix       -       -      n      -      -       smtp
relay           unix       -       -      n      -      -       smtp
showq           unix       n       -      n      -      -       showq
error           unix       -       -      n      -      -       error
retry           unix       -       -      n      -      -       error
discard         unix       -       -      n      -      -       discard
local           unix       -       n      n      -      -       local
anvil           unix       -       -      n      -      1       anvil
scache          unix       -       -      n      -      1       scache
postlog         unix-dgram n       -      n      -      1       postlogd
"""


# master daemonizes into its own session, so nothing kills it when the test run
# dies: stop whatever is still running when the interpreter exits.
_LIVE: set[PostfixInstance] = set()


@atexit.register
def _stop_leftovers() -> None:
    for instance in list(_LIVE):
        with contextlib.suppress(Exception):
            instance.stop()


class PostfixError(RuntimeError):
    """A Postfix command failed; the message carries its output and the log tail."""


def _is_live_process_of(pid: int, marker: bytes) -> bool:
    """True if `pid` is running (not a zombie) with `marker` in its environment."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
        # The state follows the parenthesised command name, which may contain spaces.
        state = stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3]
        if state in (b"Z", b"X"):
            return False
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return marker in fh.read().split(b"\0")
    except (OSError, ValueError):
        return False


class PostfixInstance:
    """A Postfix of our own: its config dir, queue, data dir and maillog in one temp dir."""

    def __init__(self, *, relay_port: int | None = None, smtpd_milters: str = "",
                 milter_default_action: str = "tempfail",
                 extra: Mapping[str, str] | None = None,
                 relay_domains: str = DEFAULT_RELAY_DOMAINS,
                 debug_peer_list: str = "",
                 base_dir: str | os.PathLike[str] | None = None,
                 save_logs_to: str | os.PathLike[str] | None = None,
                 keep_dir: bool = False, start_timeout: float = 10.0,
                 reinject_port: int | None = None, reinject_milters: str = "",
                 services: Sequence[str] = ()) -> None:
        if os.geteuid() != 0:
            raise PermissionError("a private Postfix instance needs root (master starts as root)")
        self.host = LOOPBACK
        # Nothing listens on a fresh free port: mail then defers instead of leaving the box.
        self.relay_port = relay_port if relay_port is not None else free_port()
        self.smtpd_milters = smtpd_milters
        self.milter_default_action = milter_default_action
        self.extra = dict(extra or {})
        self.relay_domains = relay_domains
        self.debug_peer_list = debug_peer_list
        self.save_logs_to = Path(save_logs_to) if save_logs_to is not None else None
        self.keep_dir = keep_dir
        self.start_timeout = start_timeout
        # A second smtpd without milters, where milters hand back copies and notices (as an
        # admin adds one to master.cf with -o smtpd_milters=).
        self.reinject_port = reinject_port
        # The milters that smtpd runs after all (the sign milter: copies and notices leave
        # signed), one socket spec, as `-o smtpd_milters=unix:/path/sign.sock`.
        self.reinject_milters = reinject_milters
        # More master.cf lines, as an admin adds them (a review release port: the review
        # recipe in docs/recipes/milters-behind-postfix.md).
        self.services = list(services)
        self._own_base = base_dir is None
        self._base_arg = Path(base_dir) if base_dir is not None else None
        self.base_dir = Path()
        self.smtp_port = 0
        self._started = False

    # -- paths -----------------------------------------------------------------

    @property
    def config_dir(self) -> Path:
        return self.base_dir / "etc"

    @property
    def queue_dir(self) -> Path:
        return self.base_dir / "queue"

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def maillog(self) -> Path:
        return self.base_dir / "maillog"

    @property
    def socket_dir(self) -> Path:
        """A directory user postfix can search, for unix-socket milters (chmod the socket 0666)."""
        return self.base_dir / "sockets"

    # -- configuration ---------------------------------------------------------

    def main_cf_params(self) -> dict[str, str]:
        """The main.cf this instance starts with (extra= applied last)."""
        params = {
            "compatibility_level": "3.6",
            "config_directory": str(self.config_dir),
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            # Logging through postlogd to a file we can read; no syslog needed.
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.base_dir),
            "myhostname": "mx.mailmoat.test",
            "mydomain": "mailmoat.test",
            "myorigin": "$myhostname",
            "inet_interfaces": self.host,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            # Nothing is local: every recipient goes to the relayhost (the sink).
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "append_dot_mydomain": "no",
            "relay_domains": self.relay_domains,
            "relayhost": f"[{self.host}]:{self.relay_port}",
            "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
            "smtpd_milters": self.smtpd_milters,
            "non_smtpd_milters": "",
            "milter_default_action": self.milter_default_action,
            "milter_protocol": "6",
            "milter_connect_timeout": "2s",
            "milter_command_timeout": "10s",
            "milter_content_timeout": "30s",
            "smtputf8_enable": "yes",
            "biff": "no",
            "message_size_limit": str(50 * 1024 * 1024),
            "mailbox_size_limit": "0",
            # Fast retries so tests that defer and flush do not wait minutes.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "smtp_connect_timeout": "2s",
            "smtp_helo_timeout": "10s",
            # One connection per delivery, so the sink sees each message's own session.
            "smtp_connection_cache_on_demand": "no",
            "smtpd_timeout": "30s",
            "smtpd_error_sleep_time": "0",
            "in_flow_delay": "0",
            "delay_warning_time": "0",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            "debug_peer_list": self.debug_peer_list,
            "debug_peer_level": "2",
        }
        params.update(self.extra)
        return params

    def _write_config(self) -> None:
        lines = ["# Private test instance written by tests/harness/postfix.py; not /etc/postfix."]
        lines += [f"{name} = {value}" for name, value in self.main_cf_params().items()]
        (self.config_dir / "main.cf").write_text("\n".join(lines) + "\n")
        master = _MASTER_CF.format(listen=f"{self.host}:{self.smtp_port}")
        if self.reinject_port:
            master += (f"{self.host}:{self.reinject_port} inet n - n - - smtpd"
                       f" -o smtpd_milters={self.reinject_milters} -o non_smtpd_milters=\n")
        for line in self.services:
            master += line + "\n"
        (self.config_dir / "master.cf").write_text(master)
        self._cool_config()

    def _cool_config(self) -> None:
        """Backdate main.cf/master.cf mtimes.

        Postfix re-reads a config file modified within the last second or so
        ("pausing to let it cool down", 300 ms naps) so it never reads a half
        written file: every command and daemon would stall up to ~2 s after
        each write.
        """
        past = time.time() - 10
        for name in ("main.cf", "master.cf"):
            os.utime(self.config_dir / name, (past, past))

    # -- running Postfix commands ----------------------------------------------

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAIL_")}
        env["LANG"] = env["LC_ALL"] = "C"
        return env

    def _run_admin(self, argv: list[str], timeout: float = 10.0) -> tuple[int, str]:
        """Run a Postfix command with a pty on stdout/stderr so it prints its errors."""
        master_fd, slave_fd = pty.openpty()
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave_fd,
                                    stderr=slave_fd, env=self._env(), close_fds=True)
        finally:
            os.close(slave_fd)
        chunks: list[bytes] = []
        deadline = time.monotonic() + timeout

        def read_available(wait: float) -> bool:
            """Append what the pty has; False once no writer is left (EOF/EIO)."""
            ready, _, _ = select.select([master_fd], [], [], wait)
            if not ready:
                return True
            try:
                data = os.read(master_fd, 65536)
            except OSError as exc:  # EIO: every writer closed the pty
                if exc.errno != errno.EIO:
                    raise
                return False
            if data:
                chunks.append(data)
            return bool(data)

        try:
            open_pty = True
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    proc.kill()
                    proc.wait()
                    raise PostfixError(f"{' '.join(argv)} timed out after {timeout}s")
                if open_pty:
                    open_pty = read_available(0.05)
                else:
                    time.sleep(0.02)
            # Drain what was written just before exit; a daemon the command spawned
            # may keep the pty open, so never wait for EOF.
            while open_pty and select.select([master_fd], [], [], 0)[0]:
                open_pty = read_available(0)
        finally:
            os.close(master_fd)
        rc = proc.wait()
        text = b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")
        return rc, text

    def _check(self, argv: list[str], timeout: float = 10.0) -> str:
        rc, out = self._run_admin(argv, timeout)
        if rc != 0:
            raise PostfixError(f"{' '.join(argv)} exited {rc}: {out.strip()}\n"
                               f"--- maillog tail ---\n{self._log_tail()}")
        return out

    def postfix_cmd(self, *args: str, timeout: float = 10.0) -> str:
        """Run `postfix -c CONFIG_DIR <args>` and return its output; PostfixError on failure."""
        return self._check([POSTFIX, "-c", str(self.config_dir), *args], timeout)

    # -- life cycle ------------------------------------------------------------

    def start(self) -> PostfixInstance:
        if self._started:
            raise RuntimeError("instance already started")
        if self._own_base:
            # Short path under /tmp (not pytest's 0700 tree) so user postfix can reach it.
            self.base_dir = Path(tempfile.mkdtemp(prefix="mailmoat-pf-")).resolve()
        else:
            assert self._base_arg is not None
            self.base_dir = self._base_arg.resolve()
            self.base_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base_dir, 0o755)
        self.config_dir.mkdir(mode=0o755, exist_ok=True)
        self.socket_dir.mkdir(mode=0o755, exist_ok=True)
        # The postfix command chdir()s into queue_directory before anything else, so it
        # must exist (root:root 0755 as postfix-files wants); its subdirectories and
        # data_directory are left to `postfix start` (owners/modes from postfix-files).
        self.queue_dir.mkdir(mode=0o755, exist_ok=True)
        self._started = True
        _LIVE.add(self)
        try:
            last_error: PostfixError | None = None
            # free_port() races with other processes: retry when bind() loses.
            for _ in range(4):
                self.smtp_port = free_port()
                self._write_config()
                offset = self.log_offset()
                try:
                    self.postfix_cmd("start", timeout=self.start_timeout)
                except PostfixError as exc:
                    self._kill_all()
                    if "Address already in use" in str(exc) + self._log_since(offset):
                        last_error = exc
                        continue
                    raise
                # master -w returns once its listeners exist; check without connecting,
                # since a probe would be an smtpd session (and a milter session).
                wait_for_listen(self.host, self.smtp_port, timeout=self.start_timeout)
                return self
            raise PostfixError(f"could not bind a free port for smtpd: {last_error}")
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate every process of this instance, then remove its directory."""
        if not self._started:
            return
        self._started = False
        _LIVE.discard(self)
        try:
            self._kill_all(timeout)
        finally:
            self._save_logs()
            if self._own_base and not self.keep_dir:
                shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> PostfixInstance:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _kill_all(self, timeout: float = 5.0) -> None:
        # SIGTERM to master is what `postfix stop` does: it signals its process group.
        # Usually all gone in ~20 ms; right after a reload a daemon master was
        # respawning can take ~1 s. SIGKILL only after `timeout`.
        master = self.master_pid()
        if master is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(master, signal.SIGTERM)
        else:
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        if self._wait_gone(timeout):
            return
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not self._wait_gone(2.0):
            raise PostfixError(f"postfix processes survived SIGKILL: {self.pids()}")

    def _wait_gone(self, timeout: float, pids: set[int] | None = None) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            alive = self.pids()
            if pids is not None:
                alive = [p for p in alive if p in pids]
            if not alive:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def _save_logs(self) -> None:
        if self.save_logs_to is None:
            return
        self.save_logs_to.mkdir(parents=True, exist_ok=True)
        for src in (self.maillog, self.config_dir / "main.cf", self.config_dir / "master.cf"):
            if src.exists():
                shutil.copyfile(src, self.save_logs_to / src.name)

    # -- processes -------------------------------------------------------------

    def pids(self) -> list[int]:
        """Live (non-zombie) processes of this instance, recognised by MAIL_CONFIG in their env."""
        if self.base_dir == Path():
            return []  # never started
        marker = f"MAIL_CONFIG={self.config_dir}".encode()
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and _is_live_process_of(int(entry), marker):
                found.append(int(entry))
        return sorted(found)

    def master_pid(self) -> int | None:
        """master's pid from its pid file, if that process is alive and ours."""
        try:
            pid = int((self.queue_dir / "pid" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        marker = f"MAIL_CONFIG={self.config_dir}".encode()
        return pid if _is_live_process_of(pid, marker) else None

    def is_running(self) -> bool:
        return self.master_pid() is not None

    # -- log -------------------------------------------------------------------

    def log_offset(self) -> int:
        """Current maillog size in bytes; pass as `since=` to only look at later lines."""
        try:
            return self.maillog.stat().st_size
        except OSError:
            return 0

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.maillog, "rb") as fh:
                fh.seek(offset)
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def log_text(self) -> str:
        """The whole maillog so far."""
        return self._log_since(0)

    def _log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_for_log(self, pattern: str | re.Pattern[str], timeout: float = 10.0,
                     since: int = 0) -> re.Match[str]:
        """First match of `pattern` (multiline) in the maillog after byte `since`."""
        regex = re.compile(pattern, re.MULTILINE) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self._log_since(since))
            if match:
                return match
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no {regex.pattern!r} in maillog after {timeout:.1f}s;"
                                   f" tail:\n{self._log_tail()}")
            time.sleep(0.05)

    # -- administration --------------------------------------------------------

    def reload(self, timeout: float = 5.0) -> None:
        """`postfix reload`, then wait until master re-read main.cf and old daemons exited.

        Old daemons could otherwise take one more connection with the old settings.
        """
        master = self.master_pid()
        old = set(self.pids()) - ({master} if master else set())
        offset = self.log_offset()
        self.postfix_cmd("reload", timeout=timeout)
        self.wait_for_log(r"postfix/master\[\d+\]: reload -- ", timeout=timeout, since=offset)
        # An old smtpd still serving a client finishes first: bounded, not an error.
        self._wait_gone(timeout, old)

    def postconf(self, name: str) -> str:
        """A parameter's current value in this instance's main.cf (or its default)."""
        return self._check([POSTCONF, "-c", str(self.config_dir), "-h", name]).strip()

    def set_main(self, params: Mapping[str, str], reload: bool = True) -> None:
        """postconf -e the parameters into main.cf, then reload (unless reload=False)."""
        if not params:
            return
        settings = [f"{name} = {value}" for name, value in params.items()]
        self._check([POSTCONF, "-c", str(self.config_dir), "-e", *settings])
        self._cool_config()
        if reload and self.is_running():
            self.reload()

    def flush(self) -> None:
        """Attempt delivery of all queued mail now (postqueue -f)."""
        self._check([POSTQUEUE, "-c", str(self.config_dir), "-f"])

    def queue(self) -> list[dict[str, object]]:
        """The queue as postqueue -j reports it, one dict per message."""
        proc = subprocess.run([POSTQUEUE, "-c", str(self.config_dir), "-j"],
                              stdin=subprocess.DEVNULL, capture_output=True,
                              env=self._env(), timeout=10, check=False)
        if proc.returncode != 0:
            raise PostfixError(f"postqueue -j exited {proc.returncode}:"
                               f" {proc.stderr.decode(errors='replace')}\n{self._log_tail()}")
        return [json.loads(line) for line in proc.stdout.decode().splitlines() if line.strip()]

    def queue_ids(self) -> list[str]:
        return [str(item["queue_id"]) for item in self.queue()]

    def wait_queue_empty(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.queue():
            if time.monotonic() >= deadline:
                raise TimeoutError(f"queue not empty after {timeout:.1f}s: {self.queue_ids()}")
            time.sleep(0.1)


@contextlib.contextmanager
def postfix_instance(tmp_path: str | os.PathLike[str] | None = None,
                     **kwargs: object) -> Iterator[PostfixInstance]:
    """Context manager for tests: a started instance whose logs land in tmp_path/postfix.

    The instance itself runs under a short /tmp dir (user postfix cannot enter
    pytest's tmp_path); main.cf, master.cf and the maillog are copied to
    tmp_path/"postfix" when it stops, for post-mortems.
    """
    if tmp_path is not None:
        kwargs.setdefault("save_logs_to", Path(tmp_path) / "postfix")
    instance = PostfixInstance(**kwargs)  # type: ignore[arg-type]
    with instance:
        yield instance

"""The pymilter adapter: one base class that turns libmilter callbacks into calls on a plain
logic object (MilterLogic), so milter logic is testable without sockets.

It negotiates only the steps a logic class uses (skipped stages are not even sent by the
MTA; stages kept only to learn the envelope are answered with NOREPLY), and it works
around pymilter 1.0.5's setsymlist bug: Milter.Base.setsymlist hands bytes to the C module,
which wants str; Base.negotiate swallows the TypeError and falls back to negotiating
everything, silently disabling every skip and no-reply flag (DESIGN.md section 11).

Logic runs in libmilter's worker threads, under a thread state pymilter makes per
connection while libmilter moves connections between threads. Native code that calls back
into Python with the GIL released (nh3's attribute_filter, sqlite3.create_function, ctypes
callbacks) finds its thread state through PyGILState_Ensure, which there can be another
thread's: the interpreter is corrupted under load. Logic must not hand such callbacks out.
"""
from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, ClassVar, Iterator

import Milter

from .edits import (AddHeader, AddRecipient, ChangeFrom, ChangeHeader, DeleteRecipient, Edit,
                    EomResult, Quarantine, ReplaceBody)
from .errors import MessageError
from .eventlog import log_event
from .message import Envelope, Message, Recipient, strip_brackets
from .milter_protocol import ActionFlag, MacroStage, ProtocolFlag
from .verdict import Action, SmtpReply, Verdict

P = ProtocolFlag
# Plain ints for the per-callback checks (enum flag arithmetic costs microseconds).
_NR_CONN, _NR_HELO, _NR_MAIL, _NR_RCPT = int(P.NR_CONN), int(P.NR_HELO), int(P.NR_MAIL), int(P.NR_RCPT)
_NR_HDR, _NR_EOH, _NR_BODY = int(P.NR_HDR), int(P.NR_EOH), int(P.NR_BODY)
_SETSYMLIST = int(ActionFlag.SETSYMLIST)
_HDR_LEADSPC = int(P.HDR_LEADSPC)
FAILURE_REPLY = SmtpReply(451, "4.3.0", "Temporary local problem, please try again later")


class MilterLogic:
    """Per-connection milter logic. Override only the stages you need: the adapter tells
    the MTA to skip the rest."""

    name: ClassVar[str] = "milter"
    actions: ClassVar[ActionFlag] = ActionFlag(0)  # end-of-message edits this milter may make
    rejected_recipients: ClassVar[bool] = False  # also see recipients the MTA rejected
    macros: ClassVar[dict[MacroStage, tuple[str, ...]]] = {}  # what we ask the MTA to send
    # Stages this logic observes but never decides at ("connect", "helo", "mail", "rcpt"):
    # the MTA is told not to wait for a reply there, which saves a round trip per stage.
    quiet_stages: ClassVar[frozenset[str]] = frozenset()
    # Headers exactly as received (SMFIP_HDR_LEADSPC keeps the space after the colon):
    # DKIM's "simple" header canonicalization hashes it.
    exact_headers: ClassVar[bool] = False
    # False: on_message needs the headers only; the MTA is told not to send the body.
    reads_body: ClassVar[bool] = True
    # True: the body is spooled to a temporary file as it comes and the message handed over
    # as an mmap, so a large message is never held in memory (attachments).
    spool_body: ClassVar[bool] = False
    # Seconds between `progress` packets while on_message runs (0: none). The MTA waits for
    # the end-of-message reply only so long (Postfix: milter_content_timeout, 300 s); a
    # milter that converts documents tells it that it is still working.
    progress_every: ClassVar[float] = 0.0

    def on_connect(self, env: Envelope) -> Verdict:
        return Verdict.cont()

    def on_helo(self, env: Envelope) -> Verdict:
        return Verdict.cont()

    def on_mail(self, env: Envelope) -> Verdict:
        return Verdict.cont()

    def on_rcpt(self, env: Envelope, rcpt: Recipient) -> Verdict:
        return Verdict.cont()

    def on_message(self, message: Message) -> EomResult:
        return EomResult(Verdict.cont())

    def body_sink(self, headers: list[tuple[str, str]],
                  leading_space: bool) -> Callable[[bytes], None]:
        """Override to take the body chunk by chunk as it comes, for logic that keeps only
        what it computes from it (auth: DKIM body hashes), so no message body is ever held
        whole. Called once per message when its header section is complete (also for an
        empty body); the Message handed to on_message then has an empty body."""
        raise NotImplementedError

    def on_abort(self, env: Envelope) -> None:
        """The transaction ended without a message (RSET, a new MAIL, or an error)."""

    def on_close(self, env: Envelope) -> None:
        """The SMTP connection ended."""


def _overrides(cls: type[MilterLogic], method: str) -> bool:
    return getattr(cls, method) is not getattr(MilterLogic, method)


def wanted_protocol(cls: type[MilterLogic]) -> ProtocolFlag:
    """The SMFIP_* flags a logic class asks for: skip what it ignores, no reply where it
    only listens. Connect, HELO, MAIL and RCPT are always received (they fill the envelope)."""
    flags = P.NODATA | P.NR_DATA | P.NOUNKNOWN | P.NR_UNKN
    for stage, no_reply in (("connect", P.NR_CONN), ("helo", P.NR_HELO),
                            ("mail", P.NR_MAIL), ("rcpt", P.NR_RCPT)):
        if not _overrides(cls, f"on_{stage}") or stage in cls.quiet_stages:
            flags |= no_reply
    if _overrides(cls, "on_message"):
        flags |= P.NR_HDR | P.NR_EOH  # we only collect; the verdict comes at EOM
        flags |= P.NR_BODY if cls.reads_body else P.NOBODY
    else:
        flags |= P.NOHDRS | P.NOEOH | P.NOBODY
    if cls.rejected_recipients:
        flags |= P.RCPT_REJ
    if cls.exact_headers:
        flags |= P.HDR_LEADSPC
    return flags


def wanted_actions(cls: type[MilterLogic]) -> ActionFlag:
    return cls.actions | (ActionFlag.SETSYMLIST if cls.macros else ActionFlag(0))


class MilterAdapter(Milter.Base):
    """One instance per SMTP connection (pymilter's model); delegates to a MilterLogic."""

    logic_factory: ClassVar[Callable[[], MilterLogic]]
    logic_class: ClassVar[type[MilterLogic]]
    # Worked out once per class (see bind()): enum arithmetic per connection is measurable.
    _want_actions: ClassVar[int] = 0
    _want_protocol: ClassVar[int] = 0
    _macro_lists: ClassVar[tuple[tuple[int, str], ...]] = ()
    _reads_message: ClassVar[bool] = False
    _sinks_body: ClassVar[bool] = False

    @classmethod
    def bind(cls, logic_class: type[MilterLogic],
             factory: Callable[[], MilterLogic]) -> type["MilterAdapter"]:
        """A pymilter class for this logic, with its negotiation precomputed."""
        return type(f"{logic_class.name.title()}Adapter", (cls,), {
            "logic_class": logic_class,
            "logic_factory": staticmethod(factory),
            "_want_actions": int(wanted_actions(logic_class)),
            "_want_protocol": int(wanted_protocol(logic_class)),
            "_macro_lists": tuple((int(stage), " ".join(names))
                                  for stage, names in logic_class.macros.items()),
            "_reads_message": _overrides(logic_class, "on_message"),
            "_sinks_body": _overrides(logic_class, "body_sink"),
        })
    # Open SMTP sessions, so that a SIGTERM lets them finish before the process exits.
    active_sessions: ClassVar[int] = 0
    _sessions_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self) -> None:
        with MilterAdapter._sessions_lock:
            MilterAdapter.active_sessions += 1
        self.logic = type(self).logic_factory()
        self.env = Envelope()
        self._headers: list[tuple[str, str]] = []
        self._body: list[bytes] = []
        self._spool: tempfile.SpooledTemporaryFile[bytes] | None = None
        self._sink: Callable[[bytes], None] | None = None
        self._sink_error: Exception | None = None
        self._protocol = 0

    # -- negotiation -------------------------------------------------------------------
    def negotiate(self, opts: list[int]) -> int:
        actions = self._want_actions & opts[0]
        protocol = self._want_protocol & opts[1]
        self._actions, self._protocol = actions, protocol
        opts[0], opts[1], opts[2], opts[3] = actions, protocol, 0, 0
        if actions & _SETSYMLIST:
            for stage, names in self._macro_lists:
                # str, not bytes: the C module rejects bytes (the pymilter 1.0.5 bug).
                self._ctx.setsymlist(stage, names)
        return Milter.CONTINUE

    # -- helpers -----------------------------------------------------------------------
    def _macro(self, name: str) -> str | None:
        value = self.getsymval(name)
        return value if value else None

    def _answer(self, stage: str, verdict: Verdict, no_reply_flag: int) -> int:
        if self._protocol & no_reply_flag:
            if verdict.action is not Action.CONTINUE:  # the MTA is not listening: a bug
                log_event("milter_error", level=logging.ERROR,
                          milter=type(self).logic_class.name, stage=stage,
                          error=f"verdict {verdict.action.value} at a no-reply stage ignored")
            return Milter.NOREPLY
        if verdict.action is Action.CONTINUE:
            return Milter.CONTINUE
        log_event("verdict", milter=type(self).logic_class.name, stage=stage,
                  action=verdict.action.value, reply=str(verdict.reply) if verdict.reply else None,
                  reason=verdict.reason or None, queue_id=self.env.queue_id,
                  ip=self.env.client_ip)
        if verdict.reply is not None:
            self.setreply(str(verdict.reply.code), verdict.reply.enhanced,
                          verdict.reply.text.replace("%", "%%"))
        return {Action.ACCEPT: Milter.ACCEPT, Action.REJECT: Milter.REJECT,
                Action.TEMPFAIL: Milter.TEMPFAIL, Action.DISCARD: Milter.DISCARD}[verdict.action]

    def _guarded(self, stage: str, call: Callable[[], Verdict], no_reply_flag: int) -> int:
        try:
            verdict = call()
        except MessageError as exc:  # the message itself is unusable: a permanent answer
            log_event("message_refused", level=logging.WARNING,
                      milter=type(self).logic_class.name, stage=stage, error=str(exc),
                      queue_id=self.env.queue_id, ip=self.env.client_ip)
            verdict = Verdict.reject(SmtpReply(554, "5.6.0", f"Malformed message: {exc}"),
                                     reason=str(exc))
        except Exception as exc:  # one broken message must never take the daemon down
            log_event("milter_error", level=logging.ERROR, milter=type(self).logic_class.name,
                      stage=stage, error=f"{type(exc).__name__}: {exc}",
                      queue_id=self.env.queue_id, ip=self.env.client_ip)
            logging.getLogger("mailmoat").debug("traceback", exc_info=True)
            verdict = Verdict.tempfail(FAILURE_REPLY, reason="internal error")
        return self._answer(stage, verdict, no_reply_flag)

    # -- callbacks ---------------------------------------------------------------------
    def connect(self, hostname: str, family: int, hostaddr: object) -> int:
        if family in (socket.AF_INET, socket.AF_INET6) and isinstance(hostaddr, tuple):
            self.env.client_ip = str(hostaddr[0])
        self.env.client_name = hostname
        return self._guarded("connect", lambda: self.logic.on_connect(self.env), _NR_CONN)

    def hello(self, heloname: str) -> int:
        self.env.helo = heloname
        return self._guarded("helo", lambda: self.logic.on_helo(self.env), _NR_HELO)

    def envfrom(self, mail_from: str, *params: str) -> int:
        self.env.start_transaction()
        self._headers, self._body = [], []
        self._sink, self._sink_error = None, None
        self._drop_spool()
        self.env.mail_from = strip_brackets(mail_from)
        self.env.mail_params = Milter.param2dict(params) if params else {}
        self.env.auth_user = self._macro("{auth_authen}")
        self.env.queue_id = self._macro("i")
        return self._guarded("mail", lambda: self.logic.on_mail(self.env), _NR_MAIL)

    def envrcpt(self, rcpt: str, *params: str) -> int:
        rejected = self._macro("{rcpt_mailer}") == "error"
        recipient = Recipient(strip_brackets(rcpt), Milter.param2dict(params) if params else {},
                              rejected_by_mta=rejected)
        self.env.recipients.append(recipient)
        self.env.queue_id = self._macro("i") or self.env.queue_id
        return self._guarded("rcpt", lambda: self.logic.on_rcpt(self.env, recipient), _NR_RCPT)

    def header(self, name: str | bytes, value: str | bytes) -> int:
        # pymilter hands the value as str decoded with surrogateescape (its header_bytes),
        # or as bytes under another decoding strategy; nothing here may raise: a failure
        # at a stage the MTA waits no reply for makes libmilter drop the rest of the
        # message unanswered, and the MTA waits for a reply that never comes.
        self._headers.append((_text(name), _text(value)))
        return Milter.NOREPLY if self._protocol & _NR_HDR else Milter.CONTINUE

    def eoh(self) -> int:
        return Milter.NOREPLY if self._protocol & _NR_EOH else Milter.CONTINUE

    def body(self, chunk: bytes) -> int:
        if self._sinks_body:
            self._to_sink(chunk)
        elif type(self).logic_class.spool_body:
            if self._spool is None:
                self._spool = tempfile.SpooledTemporaryFile(max_size=1024 * 1024)
            self._spool.write(chunk)
        else:
            self._body.append(chunk)
        return Milter.NOREPLY if self._protocol & _NR_BODY else Milter.CONTINUE

    def eom(self) -> int:
        if not self._reads_message:
            return Milter.CONTINUE
        self.env.queue_id = self._macro("i") or self.env.queue_id

        def run() -> Verdict:
            leading_space = bool(self._protocol & _HDR_LEADSPC)
            if self._sinks_body:
                self._to_sink(b"")  # a message without a body starts its sink here
                error, self._sink, self._sink_error = self._sink_error, None, None
                if error is not None:  # fail closed: answered like any error in on_message
                    raise error
                message = Message.from_headers_and_body(self._headers, b"", self.env,
                                                        leading_space=leading_space)
            elif self._spool is not None:
                message = Message.from_headers_and_file(self._headers, self._spool, self.env,
                                                        leading_space=leading_space)
                self._drop_spool()
            else:
                message = Message.from_headers_and_body(
                    self._headers, b"".join(self._body), self.env, leading_space=leading_space)
                self._body = []
            with self._progress(type(self).logic_class.progress_every):
                result = self.logic.on_message(message)
            for edit in result.edits:
                self._apply(edit)
            return result.verdict
        return self._guarded("eom", run, 0)

    def _to_sink(self, chunk: bytes) -> None:
        """Hand a body chunk to the logic's sink. An error is kept for end of message, the
        first point where the MTA hears a reply (body chunks get none: SMFIP_NR_BODY)."""
        if self._sink_error is not None:
            return
        try:
            if self._sink is None:
                self._sink = self.logic.body_sink(self._headers,
                                                  bool(self._protocol & _HDR_LEADSPC))
            if chunk:
                self._sink(chunk)
        except Exception as exc:  # noqa: BLE001 -- any failure: the message is tempfailed
            self._sink_error = exc

    @contextlib.contextmanager
    def _progress(self, every: float) -> Iterator[None]:
        """Send `progress` every `every` seconds from a helper thread until the block ends.
        libmilter writes nothing else on this connection meanwhile: the callback thread is
        inside the block, and the helper is stopped before it returns."""
        if every <= 0:
            yield
            return
        done = threading.Event()

        def beat() -> None:
            while not done.wait(every):
                try:
                    self.progress()
                except Exception:  # the MTA went away: the eom reply will fail the same way
                    return
        helper = threading.Thread(target=beat, name="milter-progress", daemon=True)
        helper.start()
        try:
            yield
        finally:
            done.set()
            helper.join()

    def _drop_spool(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    def abort(self) -> int:
        try:
            self.logic.on_abort(self.env)
        finally:
            self.env.start_transaction()
        return Milter.CONTINUE

    def close(self) -> int:
        self._drop_spool()
        try:
            self.logic.on_close(self.env)
        except Exception as exc:
            log_event("milter_error", level=logging.ERROR, milter=type(self).logic_class.name,
                      stage="close", error=f"{type(exc).__name__}: {exc}", ip=self.env.client_ip)
        finally:
            with MilterAdapter._sessions_lock:
                MilterAdapter.active_sessions -= 1
        return Milter.CONTINUE

    def _apply(self, edit: Edit) -> None:
        if isinstance(edit, AddHeader):
            self.addheader(edit.name, edit.value, -1 if edit.index is None else edit.index)
        elif isinstance(edit, ChangeHeader):
            self.chgheader(edit.name, edit.index, edit.value)
        elif isinstance(edit, AddRecipient):
            self.addrcpt(f"<{edit.address}>", edit.params)
        elif isinstance(edit, DeleteRecipient):
            self.delrcpt(f"<{edit.address}>")
        elif isinstance(edit, ReplaceBody):
            if isinstance(edit.body, bytes):
                self.replacebody(edit.body)
            else:  # libmilter takes the new body in pieces (several SMFIR_REPLBODY)
                while piece := edit.body.read(65536):
                    self.replacebody(piece)
        elif isinstance(edit, ChangeFrom):
            self.chgfrom(f"<{edit.address}>", edit.params)
        elif isinstance(edit, Quarantine):
            self.quarantine(edit.reason)


def _text(data: str | bytes) -> str:
    """A header name or value as text; bytes that are not UTF-8 kept (surrogateescape)."""
    return data if isinstance(data, str) else data.decode("utf-8", "surrogateescape")


def parse_socket_spec(spec: str) -> str:
    """Check a Postfix-style socket ('inet:127.0.0.1:8891', 'inet6:[::1]:8891', 'unix:/path')
    and return it in the form libmilter expects ('inet:8891@127.0.0.1', 'local:/path')."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ValueError(f"socket '{spec}' must look like inet:127.0.0.1:8891 or unix:/path")
    if kind in ("unix", "local"):
        return f"local:{rest}"
    if kind in ("inet", "inet6"):
        host, _, port = rest.rpartition(":")
        if "@" in rest:  # already in libmilter's port@host form
            port, _, host = rest.partition("@")
        host = host.strip("[]")
        if not port.isdigit() or not 0 < int(port) < 65536 or not host:
            raise ValueError(f"socket '{spec}' needs a host and a port, like inet:127.0.0.1:8891")
        return f"{kind}:{port}@{host}"
    raise ValueError(f"socket '{spec}': unknown type '{kind}'; use inet:, inet6: or unix:")


def remove_unix_socket(socket_spec: str) -> None:
    """On the way out: the process ends before libmilter's listener closes, and a socket
    left behind looks like a live milter to whoever checks for the file."""
    kind, _, path = socket_spec.partition(":")
    if kind in ("unix", "local") and Path(path).is_socket():  # never a file of another kind
        with contextlib.suppress(OSError):
            Path(path).unlink()


def run_milter(logic_class: type[MilterLogic], factory: Callable[[], MilterLogic],
               socket_spec: str, *, timeout: int = 600, stop: threading.Event | None = None,
               on_tick: Callable[[], None] | None = None, on_hangup: Callable[[], None] | None = None,
               tick: float = 1.0, grace: float = 10.0) -> None:
    """Serve one milter until SIGTERM/SIGINT (or `stop` is set).

    libmilter's main loop runs in a worker thread so that the main thread keeps Python's
    signal handling: libmilter blocks SIGHUP/SIGTERM/SIGINT in the threads it owns, and a
    process-directed signal goes to the main thread when that thread does not block it.
    """
    Milter.factory = MilterAdapter.bind(logic_class, factory)
    stop = stop or threading.Event()
    failure: list[BaseException] = []
    # Signal handlers only set plain flags: one that took a lock (Event.set) could find the
    # main thread holding that very lock in Event.wait and deadlock the process (it did,
    # under repeated SIGTERMs). The wakeup pipe makes the main loop's select() return at
    # once when a signal arrives; the libmilter thread writes to it when it ends.
    signalled = {"stop": False, "hangup": False}
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)

    if socket_spec.startswith(("unix:", "local:")):
        # smtpd connects as the unprivileged postfix user: the socket must be writable by it
        # (libmilter creates it with the process umask). Guard access with the directory.
        os.umask(0o111)

    def serve() -> None:
        try:
            Milter.runmilter(f"mailmoat-{logic_class.name}", parse_socket_spec(socket_spec),
                             timeout)
        except BaseException as exc:  # reported by the main thread
            failure.append(exc)
        finally:
            stop.set()
            with contextlib.suppress(OSError):
                os.write(wake_write, b"x")

    def on_signal(signum: int, _frame: object) -> None:
        signalled["hangup" if signum == signal.SIGHUP else "stop"] = True

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    worker = threading.Thread(target=serve, name="libmilter", daemon=True)
    worker.start()
    log_event("milter_started", milter=logic_class.name, listen=socket_spec)
    try:
        while not (stop.is_set() or signalled["stop"]):
            select.select([wake_read], [], [], tick)
            with contextlib.suppress(OSError):
                os.read(wake_read, 4096)
            if signalled["hangup"]:
                signalled["hangup"] = False
                if on_hangup is not None:
                    on_hangup()
            if on_tick is not None and not (stop.is_set() or signalled["stop"]):
                on_tick()
    finally:
        # The flag-only handlers and the wakeup pipe stay: a second SIGTERM during the
        # orderly stop (sessions draining, counts being written) must not kill us halfway,
        # and the libmilter thread may still write to the pipe as it ends.
        # Open sessions finish first, while libmilter still runs its event loop: once
        # smfi_stop() is called it no longer notices a peer that went away (the MTA was
        # killed), and those sessions would hold us for the whole grace period.
        deadline = time.monotonic() + grace
        while MilterAdapter.active_sessions > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        # smfi_stop() blocks until libmilter's listener wakes from its poll (about 5 s), so
        # ask for it in the background; the daemon threads die with the process.
        threading.Thread(target=Milter.milter.stop, name="libmilter-stop", daemon=True).start()
        if MilterAdapter.active_sessions > 0:
            log_event("milter_stop_forced", milter=logic_class.name,
                      open_sessions=MilterAdapter.active_sessions)
        remove_unix_socket(socket_spec)
    if failure:
        raise failure[0]
    log_event("milter_stopped", milter=logic_class.name)

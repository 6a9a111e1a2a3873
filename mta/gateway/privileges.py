"""`serve` started as root binds its ports, then becomes `gateway.user` for good.

Postfix's master is the model: it opens port 25 as root, and its daemons run as mail_owner,
which `postfix check` refuses to be root. Here `serve` itself drops after binding, so the
milters and the delivery process it starts are never root. Started as root without
`gateway.user`, serve refuses to start and names the key (fail closed: a gateway that
quietly stayed root would run every parser of hostile mail as root). `gateway.user: root`
is accepted as an explicit choice for a container whose root is already unprivileged; the
converters still run as `nobody` then (milters/neutralize/jail.py).

The other way: a service manager starts serve as the user with only CAP_NET_BIND_SERVICE
(systemd: User=, AmbientCapabilities=). Then serve clears the ambient set at start, so the
milters and delivery it starts do not inherit the capability.

A milter started on its own (`mailmoat milter NAME`, behind Postfix) follows the same rule:
as root it opens its socket (a port below 1024, or a unix socket in root's directory), then
becomes the user before it reads any mail; as root without a user it refuses (OpenDKIM's
UserID is the model, but failing closed where OpenDKIM stays root). The user comes from
gateway.user or the command line's --user, which overrides it.
"""
from __future__ import annotations

import ctypes
import grp
import os
import pwd
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from milters.core.config import GatewayConfig
from milters.core.errors import MailmoatError
from milters.core.eventlog import log_event

PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
KEY = "gateway.user"


@dataclass(frozen=True)
class RunAs:
    name: str
    uid: int
    gid: int


def plan(config: GatewayConfig, role: str = "serve") -> RunAs | None:
    """Whom `role` (serve, or "the NAME milter") becomes once its sockets are open: None
    when it stays who it is."""
    if os.geteuid() != 0:
        if config.user is not None and _lookup(config).uid != os.geteuid():
            raise MailmoatError(
                f"{config.source}: {KEY} is {config.user!r} but {role} runs as uid "
                f"{os.geteuid()}, which cannot switch users: start it as root (it drops to "
                f"{config.user} after binding) or as {config.user} itself")
        return None
    if config.user is None:
        raise MailmoatError(
            f"{config.source}: {role} runs as root: set {KEY} (e.g. `user: mailmoat` under "
            "gateway:) or give --user USER: the unprivileged user it becomes once its "
            "sockets are open; milters and delivery never run as root")
    run_as = _lookup(config)
    if run_as.uid == 0:
        log_event("running_as_root", level=30, key=KEY, role=role,
                  note="milters and delivery run as root; converters as nobody")
        return None
    return run_as


def _lookup(config: GatewayConfig) -> RunAs:
    assert config.user is not None
    try:
        entry = pwd.getpwnam(config.user)
    except KeyError:
        raise MailmoatError(f"{config.source}: {KEY}: no such user {config.user!r}") from None
    gid = entry.pw_gid
    if config.group is not None:
        try:
            gid = grp.getgrnam(config.group).gr_gid
        except KeyError:
            raise MailmoatError(f"{config.source}: gateway.group: no such group "
                                f"{config.group!r}") from None
    return RunAs(config.user, entry.pw_uid, gid)


# Sockets bound as root before the drop, taken by the listener asking for the same address.
_BOUND: dict[tuple[str, int], socket.socket] = {}


def bind_early(addresses: list[tuple[str, int]]) -> None:
    """Bind (and listen on) each address while still root; errors name no key here, the
    listener's own message does when it finds the address not bound."""
    for host, port in addresses:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(1024)
        except OSError:
            sock.close()
            continue
        sock.setblocking(False)
        _BOUND[(host, port)] = sock


def take_bound(host: str, port: int) -> socket.socket | None:
    return _BOUND.pop((host, port), None)


def become_user(config: GatewayConfig, listeners: list[tuple[str, int]]) -> None:
    """Root: bind the privileged ports among `listeners`, hand the data directories to
    gateway.user, drop to it for good, check it can use what it needs. Not root: keep any
    capability a service manager gave us from reaching our children."""
    run_as = plan(config)
    if run_as is None:
        if os.geteuid() != 0:
            clear_ambient()
            check_access(config, state_database(config))
        return
    bind_early([(host, port) for host, port in listeners if port < 1024])
    state = state_database(config)
    targets = [config.relay_default, *config.relay_routes.values()]
    maildirs = [Path(t.target[len("maildir:"):]) for t in targets
                if t.target.startswith("maildir:")]
    prepare([config.queue.dir, config.run_dir, *maildirs], state, run_as)
    drop(run_as)
    check_access(config, state)


def become_milter_user(config: GatewayConfig, name: str, listen: str) -> None:
    """A milter started as root: open its socket, hand it and the state database to the
    user, drop for good, check the user can read what the milter reads. libmilter keeps the
    socket it opened here: its own opensocket later finds it open and does nothing."""
    run_as = plan(config, f"the {name} milter")
    if run_as is None:
        if os.geteuid() != 0:
            clear_ambient()
            check_access(config, state_database(config), milter=True)
        return
    open_milter_socket(name, listen, run_as)
    state = state_database(config)
    prepare([], state, run_as)
    drop(run_as)
    check_access(config, state, milter=True)


def open_milter_socket(name: str, listen: str, run_as: RunAs) -> None:
    import milter  # pymilter's libmilter binding: only a milter process loads it

    from milters.core.adapter import parse_socket_spec
    spec = parse_socket_spec(listen)
    milter.setconn(spec)
    milter.register(f"mailmoat-{name}")  # opensocket needs one; run_milter registers again
    # smtpd connects as the unprivileged postfix user: like run_milter, the socket is made
    # writable by everyone, and its directory guards access.
    previous = os.umask(0o111)
    try:
        milter.opensocket(True)
    except milter.error:
        raise MailmoatError(f"--listen {listen}: cannot open this socket as root "
                            "(in use, or its directory is missing)") from None
    finally:
        os.umask(previous)
    if spec.startswith("local:"):  # the user may then remove or replace it, as its owner
        os.chown(spec[len("local:"):], run_as.uid, run_as.gid)
    log_event("milter_socket_opened", milter=name, listen=listen, as_user="root")


def state_database(config: GatewayConfig) -> Path | None:
    if config.store.startswith("sqlite:///"):
        return Path(config.store[len("sqlite:///"):])
    return None


def prepare(data_dirs: list[Path], database: Path | None, run_as: RunAs) -> None:
    """The data directories (spool, run_dir, Maildir) become the user's, with all they
    hold: chown only what is not theirs yet, so a restart over a big spool costs one walk.
    Of the state database only its files: its directory may hold the config too, which
    must stay root's (as Postfix's main.cf does, beside a data_directory of its own)."""
    # The database first: a directory made for it (var/ of the defaults) is the user's.
    if database is not None:
        if not database.parent.exists():  # made for it here: then it is the user's
            database.parent.mkdir(parents=True)
            _own(database.parent, run_as)
        for suffix in ("", "-wal", "-shm", "-journal"):
            path = database.with_name(database.name + suffix)
            if path.exists():
                _own(path, run_as)
    for top in data_dirs:
        top.mkdir(parents=True, exist_ok=True)
        for directory, dirnames, filenames in os.walk(top):
            for name in [directory, *(os.path.join(directory, n) for n in dirnames + filenames)]:
                _own(Path(name), run_as)


def _own(path: Path, run_as: RunAs) -> None:
    status = os.lstat(path)
    if (status.st_uid, status.st_gid) != (run_as.uid, run_as.gid):
        os.chown(path, run_as.uid, run_as.gid, follow_symlinks=False)


def drop(run_as: RunAs) -> None:
    """Groups, then gid, then uid (after setuid nothing else could be changed), all three
    ids of each; then prove root cannot come back, and forbid setuid programs from
    granting it (no_new_privs)."""
    os.initgroups(run_as.name, run_as.gid)
    os.setresgid(run_as.gid, run_as.gid, run_as.gid)
    os.setresuid(run_as.uid, run_as.uid, run_as.uid)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise MailmoatError(f"cannot set no_new_privs: {os.strerror(ctypes.get_errno())}")
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise MailmoatError(f"still able to become root after dropping to {run_as.name}")
    if set(os.getresuid()) != {run_as.uid} or set(os.getresgid()) != {run_as.gid}:
        raise MailmoatError(f"privilege drop to {run_as.name} incomplete")
    os.environ.update(USER=run_as.name, LOGNAME=run_as.name)
    log_event("privileges_dropped", user=run_as.name, uid=run_as.uid, gid=run_as.gid,
              groups=",".join(map(str, os.getgroups())))


def clear_ambient() -> None:
    """Keep a capability a service manager gave serve (to bind) from reaching its children."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)


def _existing(path: Path) -> Path:
    """The path, or the nearest directory above it that exists (where it will be made)."""
    while not os.path.exists(path) and path.parent != path:  # False where it cannot look
        path = path.parent
    return path


def check_access(config: GatewayConfig, database: Path | None, milter: bool = False) -> None:
    """After the drop, or at start as a user: what serve and its children need (a milter:
    what it reads), usable by the user now, or a clear error naming the setting (instead of
    a milter dying at its first message). A directory not made yet must be makeable."""
    needs = [] if milter else [(config.queue.dir, "gateway.queue.dir", os.W_OK | os.X_OK),
                               (config.run_dir, "gateway.run_dir", os.W_OK | os.X_OK)]
    needs += [(config.policy, "policy", os.R_OK),
              (Path(sys.executable), "the Python running mailmoat", os.X_OK)]
    if not milter:  # STARTTLS's files are read after the drop
        needs += [(path, key, os.R_OK) for path, key in ((config.tls_cert, "gateway.tls.cert"),
                                                         (config.tls_key, "gateway.tls.key"))
                  if path is not None]
    if database is not None:  # SQLite makes its -wal and -shm files beside the database
        needs.append((database.parent, "store (its directory)", os.W_OK | os.X_OK))
    if config.source != "(embedded defaults)":
        needs.append((Path(config.source), "--config", os.R_OK))
    user = pwd.getpwuid(os.getuid()).pw_name
    for path, key, mode in needs:
        there = _existing(Path(path))
        if there != path:
            mode = os.W_OK | os.X_OK  # to make what is missing
        if mode & os.W_OK and os.statvfs(there).f_flag & os.ST_RDONLY:
            raise MailmoatError(f"{key}: {path} is on a read-only file system (under systemd "
                                "with ProtectSystem=strict: keep it in the unit's "
                                "ReadWritePaths=, StateDirectory= or RuntimeDirectory=)")
        if not os.access(there, mode):
            raise MailmoatError(f"{key}: {path} is not usable by user {user} (uid "
                                f"{os.getuid()}): give it to that user, or make it and the "
                                "directories above it readable and traversable for it")

"""The walls around one conversion: Debian's bubblewrap (`bwrap`) gives the worker a file
system of its own, in which only its private directory is writable and nothing private is
readable, and new namespaces (no network, no other processes, no IPC, its own host name).

The view holds /usr (with /lib, /bin as its symlinks), the fonts LibreOffice draws with, the
dynamic linker's cache, the Python that runs the worker and the `milters` package: no /etc
at large (passwords, the gateway's config), no /home, /root, /var, no spool, no sockets. Its
environment is empty but for the few variables named below, so no secret of the milter's
(a Redis password, an app password) reaches a converter.

Who the converter is: a milter run by an unprivileged user (what `serve` does after it drops
root) starts bwrap as itself with a new user namespace; the worker keeps that uid but owns
nothing of the outside, and a process limit set inside counts only its own processes. A
milter run as root (behind Postfix, or `gateway.user: root`) starts bwrap as root, so that
it can reach every path it binds, and the worker becomes `nobody` before anything runs
(setpriv, no capabilities, no_new_privs): like Postfix's default_privs, the user an
untrusted program is run as when nobody else is named. A converter never runs as root.
"""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import milters

BWRAP = "bwrap"
SETPRIV = "setpriv"
CONVERTER_USER = "nobody"  # when the milter is root: Postfix's default_privs
# What LibreOffice and Python read besides /usr; each only when it exists.
SHARED_READ_ONLY = ("/etc/fonts", "/etc/ld.so.cache", "/etc/libreoffice", "/etc/alternatives",
                    "/etc/localtime")
USR_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
PATH = "/usr/local/bin:/usr/bin:/bin"
VAR_TMP = Path("/var/tmp")
PIPE_DIR = "var-tmp"  # in the private directory, seen as /var/tmp


class JailUnavailable(Exception):
    """bubblewrap is missing or cannot make its namespaces here."""


@dataclass(frozen=True)
class Converter:
    """Who runs the worker: the milter's own uid, or `nobody` when the milter is root."""
    uid: int
    gid: int
    switch: bool  # True: root starts bwrap and setpriv switches to uid/gid inside


def converter() -> Converter:
    if os.geteuid() != 0:
        return Converter(os.geteuid(), os.getegid(), switch=False)
    entry = pwd.getpwnam(CONVERTER_USER)
    return Converter(entry.pw_uid, entry.pw_gid, switch=True)


def _python_roots() -> list[Path]:
    """The directories the worker's Python needs: the venv, the real installation (it may
    live where the converter could not look, e.g. /root/.pyenv) and `milters` itself."""
    roots = [Path(sys.prefix), Path(sys.base_prefix), Path(milters.__file__).resolve().parent]
    executable = Path(sys.executable)
    roots.append(executable.resolve().parent.parent)
    return roots


def _under(path: Path, parents: list[Path]) -> bool:
    return any(path == p or p in path.parents for p in parents)


def view(workdir: Path, extra_read_only: list[Path]) -> list[str]:
    """bwrap's arguments for the file system: /usr, the shared files, the Python roots and
    `extra_read_only` read-only, `workdir` read-write, then the root made read-only."""
    args = ["--ro-bind", "/usr", "/usr"]
    for link in USR_LINKS:
        if os.path.islink(link):
            args += ["--symlink", os.readlink(link), link]
        elif os.path.isdir(link):
            args += ["--ro-bind", link, link]
    bound = [Path("/usr")]
    made: set[Path] = set()

    def parents_of(path: Path) -> list[str]:
        # bwrap as root would make them 0700; the converter must pass through them.
        out = []
        for parent in reversed(path.parents[:-1]):
            if parent not in made:
                made.add(parent)
                out += ["--perms", "0755", "--dir", str(parent)]
        return out

    for path in [*map(Path, SHARED_READ_ONLY), *_python_roots(), *extra_read_only]:
        if path.exists() and not _under(path, bound):
            args += [*parents_of(path), "--ro-bind", str(path), str(path)]
            bound.append(path)
    # LibreOffice makes its pipe in /tmp or else /var/tmp, nowhere else: /var/tmp is a
    # directory inside the private one, /tmp stays read-only.
    args += ["--dev", "/dev", "--proc", "/proc", *parents_of(workdir),
             "--bind", str(workdir), str(workdir), *parents_of(VAR_TMP),
             "--bind", str(workdir / PIPE_DIR), str(VAR_TMP), "--remount-ro", "/"]
    return args


def environment(workdir: Path) -> list[str]:
    """The only variables the worker sees (bwrap starts from --clearenv)."""
    package_root = Path(milters.__file__).resolve().parent.parent
    names = {"HOME": str(workdir), "TMPDIR": str(workdir), "PATH": PATH, "LANG": "C.UTF-8",
             "PYTHONPATH": str(package_root), "PYTHONDONTWRITEBYTECODE": "1"}
    return [arg for name, value in names.items() for arg in ("--setenv", name, value)]


def command(worker: list[str], workdir: Path, extra_read_only: list[Path],
            who: Converter) -> list[str]:
    """The whole command line that runs `worker` inside the jail."""
    bwrap = shutil.which(BWRAP)
    if bwrap is None:
        raise JailUnavailable(f"{BWRAP} is not installed (Debian package bubblewrap)")
    namespaces = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
                  "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--clearenv"]
    if not who.switch:
        # Its own user namespace, in which it cannot make another one.
        namespaces = ["--unshare-user", "--disable-userns", *namespaces]
        prefix: list[str] = []
    else:
        setpriv = shutil.which(SETPRIV, path=PATH)
        if setpriv is None:
            raise JailUnavailable(f"{SETPRIV} is not installed (Debian package util-linux)")
        # bwrap as root drops every capability but these two, which setpriv needs to
        # become `nobody`; setuid away from 0 then clears them all.
        namespaces += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        prefix = [setpriv, f"--reuid={who.uid}", f"--regid={who.gid}", "--clear-groups",
                  "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
    return [bwrap, *namespaces, *environment(workdir), *view(workdir, extra_read_only),
            "--chdir", str(workdir), "--", *prefix, *worker]


def become(who: Converter) -> None:
    """In the child before exec, when there is no jail (require_sandbox: false): at least
    not root."""
    if who.switch:
        os.setgroups([])
        os.setresgid(who.gid, who.gid, who.gid)
        os.setresuid(who.uid, who.uid, who.uid)


def hand_over(workdir: Path, who: Converter) -> None:
    """The private directory (and what the milter put in it) becomes the converter's,
    with modes set here rather than left to the milter's umask."""
    workdir.chmod(0o700)  # mkdtemp's 0700 less the milter's umask (0111) lacks x
    (workdir / PIPE_DIR).mkdir(exist_ok=True)
    for path in [workdir, *workdir.iterdir()]:
        path.chmod(0o700 if path.is_dir() else 0o600)
        if who.switch:
            os.chown(path, who.uid, who.gid, follow_symlinks=False)


_PROBED: dict[tuple[int, bool], str | None] = {}
_PROBE_LOCK = threading.Lock()


def probe() -> str | None:
    """Whether the jail can be built here (tried once per process): None, or why not."""
    try:
        who = converter()
    except KeyError:
        return f"no user {CONVERTER_USER!r} to run converters as"
    key = (who.uid, who.switch)
    with _PROBE_LOCK:
        if key not in _PROBED:
            scratch = Path(tempfile.mkdtemp(prefix="mailmoat-jail-probe-"))
            try:
                hand_over(scratch, who)
                _PROBED[key] = _try(scratch, who)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        return _PROBED[key]


def _try(scratch: Path, who: Converter) -> str | None:
    try:
        argv = command([sys.executable, "-P", "-c", "pass"], scratch, [], who)
    except JailUnavailable as exc:
        return str(exc)
    try:
        done = subprocess.run(argv, capture_output=True, timeout=30, env={},
                              stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{BWRAP} failed to run: {exc}"
    if done.returncode != 0:
        said = done.stderr.decode("utf-8", "replace").strip()[-300:]
        return f"{BWRAP} cannot make a sandbox here (exit {done.returncode}: {said})"
    return None

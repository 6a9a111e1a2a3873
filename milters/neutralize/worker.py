"""One conversion in a process of its own: `python -m milters.neutralize.worker DIR` runs
the job written to DIR/job.json and writes the outcome to DIR/result.json.

It starts inside the jail (jail.py: bubblewrap) and first locks itself in further: a new
session (so the milter can kill it with everything it started, LibreOffice included), limits
on CPU time, address space, file size, processes and core dumps, a check that its network
namespace holds nothing but loopback, and its private directory as home and working
directory. Then it does one job and writes the outcome to result.json.
"""
from __future__ import annotations

import ctypes
import json
import os
import resource
import socket
import sys
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .convert import (ConversionFailed, Options, Unreadable, flatten_pdf, office_to_pdf,
                      reencode_image)
from .encrypted import Budget, OverLimit, locked

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
RESULT = "result.json"
JOB = "job.json"


@dataclass(frozen=True)
class Job:
    operation: str  # flatten-pdf | flatten-office | image | inspect
    source: str  # the attachment's copy, under a safe name, in the private directory
    target: str
    options: Options
    check_locked: bool = True  # look for a password first (archives, Office, PDF)
    archive_depth: int = 3
    archive_bytes: int = 100 * 1024 * 1024
    cpu: float = 60.0
    memory: int = 2 * 1024 * 1024 * 1024
    file_size: int = 512 * 1024 * 1024
    # Processes and threads (the kernel counts both) of this conversion: LibreOffice runs
    # some dozens of threads; a fork bomb stops here.
    processes: int = 256
    require_sandbox: bool = True
    jailed: bool = True  # started by the sandbox inside bubblewrap (jail.py)


@dataclass
class Outcome:
    # converted | kept | locked | unreadable (the converter says the file is not what it
    # claims: permanent) | failed (crash, limit, timeout: may pass on another try)
    status: str
    reason: str = ""
    pages: int = 0
    notes: list[str] = field(default_factory=list)


def _private_network() -> str | None:
    """A network namespace with only a loopback that is down: nothing can be reached.
    Root can make one directly; others through a user namespace. None when it worked."""
    libc = ctypes.CDLL(None, use_errno=True)
    for flags in (CLONE_NEWNET, CLONE_NEWUSER | CLONE_NEWNET):
        if libc.unshare(flags) == 0:
            return None
    return os.strerror(ctypes.get_errno())


def _network_is_private() -> str | None:
    """Inside the jail the network namespace is bwrap's: say so only if it really has
    nothing but loopback (a jail misbuilt must not convert). None when it holds."""
    names = sorted(name for _, name in socket.if_nameindex())
    return None if names == ["lo"] else f"network interfaces {', '.join(names)} are visible"


def _lock_in(job: Job, workdir: Path) -> list[str]:
    if os.getsid(0) != os.getpid():
        os.setsid()
    os.umask(0o077)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    cpu = max(1, int(job.cpu))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
    resource.setrlimit(resource.RLIMIT_AS, (job.memory, job.memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (job.file_size, job.file_size))
    # Counted per user (per user namespace inside the jail): never root here, where the
    # kernel would not enforce it.
    resource.setrlimit(resource.RLIMIT_NPROC, (job.processes, job.processes))
    os.chdir(workdir)
    os.environ.update(HOME=str(workdir), TMPDIR=str(workdir))
    problem = _network_is_private() if job.jailed else _private_network()
    if problem is None:
        return []
    if job.require_sandbox or job.jailed:
        raise ConversionFailed(f"no private network namespace could be made ({problem})")
    return [f"converted without a private network namespace ({problem})"]


def _do(job: Job, workdir: Path) -> Outcome:
    source, target = Path(job.source), Path(job.target)
    if job.check_locked:
        budget = Budget(job.archive_depth, job.archive_bytes, scratch=workdir)
        why = locked(source, budget)
        if why:
            return Outcome("locked", why)
    if job.operation == "inspect":
        return Outcome("kept")
    if job.operation == "image":
        reencode_image(source, target, job.options)
        return Outcome("converted")
    if job.operation == "flatten-office":
        source = office_to_pdf(source, workdir, job.options)
    pages = flatten_pdf(source, target, job.options)
    return Outcome("converted", pages=pages)


def write_job(job: Job, workdir: Path) -> None:
    (workdir / JOB).write_text(json.dumps(asdict(job)))


def _read_job(workdir: Path) -> Job:
    data = json.loads((workdir / JOB).read_text())
    return Job(**{**data, "options": Options(**data["options"])})


def run(workdir: str) -> None:
    """The sandboxed process's whole life."""
    where = Path(workdir)
    job = _read_job(where)
    try:
        notes = _lock_in(job, where)
        outcome = _do(job, where)
        outcome.notes += notes
    except Unreadable as exc:
        outcome = Outcome("unreadable", str(exc))
    except (ConversionFailed, OverLimit) as exc:
        outcome = Outcome("failed", str(exc))
    except MemoryError:
        outcome = Outcome("failed", "over the memory limit")
    except Exception as exc:  # a converter bug must still end in a defined outcome
        outcome = Outcome("failed", f"converter error: {type(exc).__name__}: {exc}"[:300])
        traceback.print_exc(file=sys.stderr)
    (where / RESULT).write_text(json.dumps(asdict(outcome)))


def read_outcome(workdir: Path) -> Outcome | None:
    try:
        data = json.loads((workdir / RESULT).read_text())
        return Outcome(**data)
    except (OSError, ValueError, TypeError):
        return None


if __name__ == "__main__":
    run(sys.argv[1])

"""Running conversions in separate processes, at most `workers` at a time, each killed with
everything it started when it runs past its wall time.

Each job gets a fresh Python process (`python -m milters.neutralize.worker DIR`, about
0.1 s to start with pdfium and Pillow loaded): nothing one hostile document does can touch
the next one or the milter. It runs inside bubblewrap (jail.py: its own file system view,
user, network, pid and IPC namespaces, an empty environment) and locks itself in further
before it reads the file (worker.py: rlimits, a process count); bwrap is started in a
session of its own with --die-with-parent, so that the whole group, LibreOffice included,
can be killed at once.
"""
from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO, Callable

from milters.core.eventlog import log_event

from . import jail
from .worker import Job, Outcome, read_outcome, write_job

# Builds the job once the sandbox knows where the input and the output live.
JobMaker = Callable[[str, str], Job]
STDERR_KEPT = 2000  # characters of a converter's complaint kept for the log
PREFIX = "mailmoat-neutralize-"  # + the milter's pid + "-": whose directory it is


class _Running:
    """The conversions in progress in this process, so that none outlives the milter: at
    exit (SIGTERM included) their process groups are killed and their directories removed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.jobs: dict[Path, int | None] = {}  # private directory -> process group

    def stop_all(self) -> None:
        with self.lock:
            jobs = list(self.jobs.items())
        for workdir, group in jobs:
            _kill_group(group)
            shutil.rmtree(workdir, ignore_errors=True)


_RUNNING = _Running()
atexit.register(_RUNNING.stop_all)


def remove_stale(tmp: Path | None = None) -> list[Path]:
    """Directories left by a milter that died without cleaning up (SIGKILL, a crash): those
    whose owner pid no longer runs."""
    removed = []
    for path in Path(tmp or tempfile.gettempdir()).glob(PREFIX + "*-*"):
        owner = path.name[len(PREFIX):].split("-", 1)[0]
        if owner.isdigit() and not _alive(int(owner)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Sandbox:
    def __init__(self, workers: int = 0, wall: float = 120.0) -> None:
        self.slots = threading.BoundedSemaphore(workers or os.cpu_count() or 1)
        self.wall = wall
        for path in remove_stale():
            log_event("sandbox_stale_removed", level=logging.WARNING, dir=str(path))

    def convert(self, job_for: JobMaker, data: BinaryIO,
                suffix: str) -> tuple[Outcome, BinaryIO | None]:
        """Copy the attachment into a private directory, run the job on it, and hand back
        the outcome and (when converted) the result, read before the directory goes."""
        with self.slots:
            workdir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))
            workdir.chmod(0o700)  # mkdtemp's 0700 less the milter's umask (0111) lacks x
            with _RUNNING.lock:
                _RUNNING.jobs[workdir] = None
            try:
                source = workdir / f"input{suffix}"
                with open(source, "wb") as out:
                    shutil.copyfileobj(data, out)
                job = job_for(str(source), str(workdir / "output"))
                outcome = self._run(job, workdir)
                if outcome.status != "converted":
                    return outcome, None
                result = tempfile.TemporaryFile()
                with open(job.target, "rb") as produced:
                    shutil.copyfileobj(produced, result)
                result.seek(0)
                return outcome, result
            finally:
                with _RUNNING.lock:
                    _RUNNING.jobs.pop(workdir, None)
                shutil.rmtree(workdir, ignore_errors=True)

    def _run(self, job: Job, workdir: Path) -> Outcome:
        who = jail.converter()
        problem = jail.probe()
        if problem is not None:
            log_event("sandbox_unavailable", level=logging.ERROR, error=problem,
                      action="refused" if job.require_sandbox else "converted without it")
            if job.require_sandbox:
                return Outcome("failed", f"no sandbox for the converter ({problem})")
        # LibreOffice by its full path: the jail's PATH is not the milter's.
        program = shutil.which(job.options.soffice)
        options = replace(job.options, soffice=program or job.options.soffice)
        job = replace(job, options=options, jailed=problem is None)
        write_job(job, workdir)
        worker = [sys.executable, "-P", "-m", "milters.neutralize.worker", str(workdir)]
        jail.hand_over(workdir, who)
        if problem is None:
            command, become = jail.command(worker, workdir, _program_files(program), who), None
        else:  # require_sandbox: false and no bwrap here: rlimits, a network namespace
            command, become = worker, (lambda: jail.become(who))  # and never root
        started = time.monotonic()
        with open(workdir / "stderr", "wb") as errors:
            # env={}: even bwrap itself (pid 1 of the sandbox) holds none of our secrets.
            try:
                process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                           stdout=subprocess.DEVNULL, stderr=errors,
                                           start_new_session=True, close_fds=True,
                                           env={} if problem is None else None,
                                           preexec_fn=become)
            except OSError as exc:  # e.g. without the jail, `nobody` may not run our Python
                log_event("converter_not_started", level=logging.ERROR, error=str(exc))
                return Outcome("failed", f"the converter could not be started "
                                         f"({exc.strerror or exc})")
        with _RUNNING.lock:
            _RUNNING.jobs[workdir] = process.pid
        try:
            code = process.wait(self.wall)
        except subprocess.TimeoutExpired:
            _kill_group(process.pid)
            process.wait()
            return Outcome("failed", f"took longer than {self.wall:g} s")
        _kill_group(process.pid)  # anything it left behind (a stuck LibreOffice)
        if problem is None and code > 128:
            code = 128 - code  # bwrap reports a worker killed by signal N as exit 128+N
        outcome = read_outcome(workdir)
        if outcome is None or outcome.status == "failed":
            _log_stderr(workdir, code)
        if outcome is not None:
            return outcome
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            if -code in (signal.SIGXCPU, signal.SIGKILL) and \
                    time.monotonic() - started < self.wall:
                return Outcome("failed", f"over the CPU or memory limit ({name})")
            return Outcome("failed", f"the converter crashed ({name})")
        return Outcome("failed", f"the converter ended without an answer (exit {code})")


def _program_files(found: str | None) -> list[Path]:
    """What of LibreOffice must be visible besides /usr: nothing for Debian's package; a
    LibreOffice installed elsewhere (<dir>/program/soffice) brings its whole <dir>; any
    other program (a wrapper) only its own file, never its directory's neighbours."""
    if found is None:
        return []
    program = Path(found).resolve()
    if program.parent.name == "program":
        return [Path(found), program.parent.parent]
    return [Path(found), program]


def _log_stderr(workdir: Path, code: int) -> None:
    """What a failed converter said, for the admin (tracebacks, LibreOffice's complaints)."""
    try:
        said = (workdir / "stderr").read_bytes()[-STDERR_KEPT:].decode("utf-8", "replace")
    except OSError:
        return
    if said.strip():
        log_event("converter_output", level=logging.WARNING, exit=code,
                  stderr=" | ".join(line for line in said.splitlines() if line.strip()))


def _kill_group(pid: int | None) -> None:
    if pid is None:
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


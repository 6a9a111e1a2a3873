"""Running conversions in separate processes, at most `workers` at a time, each killed with
everything it started when it runs past its wall time.

Each job gets a fresh Python process (`python -m milters.neutralize.worker DIR`, about
0.1 s to start with pdfium and Pillow loaded): nothing one hostile document does can touch
the next one or the milter. The process locks itself in before it reads the file (see
worker.py); it is started in a session of its own so that the whole group, LibreOffice
included, can be killed at once.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import BinaryIO, Callable

from .worker import Job, Outcome, read_outcome, write_job

# Builds the job once the sandbox knows where the input and the output live.
JobMaker = Callable[[str, str], Job]
STDERR_KEPT = 2000  # characters of a converter's complaint kept for the log


class Sandbox:
    def __init__(self, workers: int = 0, wall: float = 120.0) -> None:
        self.slots = threading.BoundedSemaphore(workers or os.cpu_count() or 1)
        self.wall = wall

    def convert(self, job_for: JobMaker, data: BinaryIO,
                suffix: str) -> tuple[Outcome, BinaryIO | None]:
        """Copy the attachment into a private directory, run the job on it, and hand back
        the outcome and (when converted) the result, read before the directory goes."""
        with self.slots:
            workdir = Path(tempfile.mkdtemp(prefix="mailmoat-neutralize-"))
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
                shutil.rmtree(workdir, ignore_errors=True)

    def _run(self, job: Job, workdir: Path) -> Outcome:
        write_job(job, workdir)
        started = time.monotonic()
        with open(workdir / "stderr", "wb") as errors:
            process = subprocess.Popen([sys.executable, "-m", "milters.neutralize.worker",
                                        str(workdir)], stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=errors,
                                       start_new_session=True, close_fds=True)
        try:
            code = process.wait(self.wall)
        except subprocess.TimeoutExpired:
            _kill_group(process.pid)
            process.wait()
            return Outcome("failed", f"took longer than {self.wall:g} s")
        _kill_group(process.pid)  # anything it left behind (a stuck LibreOffice)
        outcome = read_outcome(workdir)
        if outcome is not None:
            return outcome
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            if -code in (signal.SIGXCPU, signal.SIGKILL) and \
                    time.monotonic() - started < self.wall:
                return Outcome("failed", f"over the CPU or memory limit ({name})")
            return Outcome("failed", f"the converter crashed ({name})")
        return Outcome("failed", f"the converter ended without an answer (exit {code})")


def _kill_group(pid: int | None) -> None:
    if pid is None:
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


"""Postfix's queue as the review runner sees it, through Postfix's own commands:
`postqueue -j` (where each message is), `postsuper -H` (release from hold; it moves the
message to the deferred queue) then `postqueue -i` (deliver it now), `postsuper -d ID hold`
(delete it, only from hold). postsuper is reserved to root: the runner runs as root.
"""
from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass

from milters.core.errors import MailmoatError

# Short (hex) and long (base 52-ish) queue IDs; never "-", which makes postsuper read stdin.
QUEUE_ID = re.compile(r"[0-9A-Za-z]{6,32}\Z")
TIMEOUT = 60.0


class PostfixCommandFailed(MailmoatError):
    """A Postfix command failed or could not be run; the runner tries again next round."""


@dataclass(frozen=True)
class PostfixQueue:
    config_dir: str | None = None  # -c DIR: another instance than /etc/postfix
    postqueue: str = "postqueue"
    postsuper: str = "postsuper"

    def _run(self, *argv: str) -> tuple[str, str]:
        """(stdout, stdout and stderr) of one command; PostfixCommandFailed unless it
        exits 0. The config directory goes first: every Postfix command takes -c DIR."""
        command = [argv[0], *(("-c", self.config_dir) if self.config_dir else ()), *argv[1:]]
        try:
            done = subprocess.run(command, capture_output=True, timeout=TIMEOUT, check=False,
                                  stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PostfixCommandFailed(f"{' '.join(command)}: {exc}") from None
        out = done.stdout.decode(errors="replace")
        said = (out + done.stderr.decode(errors="replace")).strip()
        if done.returncode != 0:
            raise PostfixCommandFailed(f"{' '.join(command)} exited {done.returncode}: "
                                       f"{said[-500:] or '(no output)'}")
        return out, said

    def listing(self) -> dict[str, str]:
        """queue ID -> the queue it is in (incoming, active, deferred, hold, ...)."""
        out, _ = self._run(self.postqueue, "-j")
        found: dict[str, str] = {}
        for line in out.splitlines():
            try:
                entry = json.loads(line)
                found[str(entry["queue_id"])] = str(entry["queue_name"])
            except (ValueError, KeyError, TypeError):
                raise PostfixCommandFailed(f"postqueue -j printed a line that is not its "
                                           f"JSON: {line[:200]!r}") from None
        return found

    def release(self, queue_id: str) -> None:
        """Out of hold and delivered now (not at the deferred queue's next scan)."""
        _, said = self._run(self.postsuper, "-H", _checked(queue_id))
        if not re.search(r"[Rr]eleased from hold: [1-9]", said):
            raise PostfixCommandFailed(f"postsuper -H {queue_id} released nothing: {said}")
        self.deliver_now(queue_id)

    def release_many(self, queue_ids: list[str]) -> set[str]:
        """Out of hold in one `postsuper -H -` (the IDs on its standard input, not one
        process each); the IDs it released. Not yet delivered: deliver_now each."""
        checked = [_checked(q) for q in queue_ids]
        command = [self.postsuper, *(("-c", self.config_dir) if self.config_dir else ()),
                   "-H", "-"]
        try:
            done = subprocess.run(command, input="\n".join(checked).encode(),
                                  capture_output=True, timeout=TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PostfixCommandFailed(f"{' '.join(command)}: {exc}") from None
        said = (done.stdout + done.stderr).decode(errors="replace")
        if done.returncode != 0:
            raise PostfixCommandFailed(f"{' '.join(command)} exited {done.returncode}: "
                                       f"{said[-500:].strip() or '(no output)'}")
        return set(re.findall(r"^postsuper: ([0-9A-Za-z]+): released from hold$", said,
                              re.MULTILINE)) & set(checked)

    def deliver_now(self, queue_id: str) -> None:
        """A released message out of the deferred queue now, not at its next scan."""
        self._run(self.postqueue, "-i", _checked(queue_id))

    def delete(self, queue_id: str) -> None:
        _, said = self._run(self.postsuper, "-d", _checked(queue_id), "hold")
        if not re.search(r"[Dd]eleted: [1-9]", said):
            raise PostfixCommandFailed(f"postsuper -d {queue_id} hold deleted nothing: "
                                       f"{said}")


def _checked(queue_id: str) -> str:
    if not QUEUE_ID.match(queue_id or ""):
        raise PostfixCommandFailed(f"not a Postfix queue ID: {str(queue_id)[:40]!r}")
    return queue_id

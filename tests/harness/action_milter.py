"""A small pymilter milter that exercises every milter action, for testing milter clients.

    python -m tests.harness.action_milter inet:PORT@127.0.0.1

RCPT <reject-me@...> gets `550 5.7.1 No such user here`, <tempfail-me@...> gets
`451 4.7.1 Try again later`. A message with `X-Skip-Body: yes` answers SKIP to the first
body chunk. At end of message it calls progress(), then makes one edit of every kind and
reports what it saw in headers (X-Seen-*).
"""
from __future__ import annotations

import sys

import Milter


class ActionMilter(Milter.Base):
    def __init__(self) -> None:
        self.chunks: list[int] = []
        self.skip_body = False
        self.macros_seen: list[str] = []

    def envfrom(self, mail_from: str, *params: str) -> int:
        self.chunks, self.skip_body = [], False
        self.macros_seen = [f"{name}={self.getsymval(name)}" for name in ("i", "{auth_authen}")
                            if self.getsymval(name)]
        return Milter.CONTINUE

    def envrcpt(self, rcpt: str, *params: str) -> int:
        if "reject-me" in rcpt:
            self.setreply("550", "5.7.1", "No such user here")
            return Milter.REJECT
        if "tempfail-me" in rcpt:
            self.setreply("451", "4.7.1", "Try again later")
            return Milter.TEMPFAIL
        return Milter.CONTINUE

    def header(self, name: str, value: str) -> int:
        if name.lower() == "x-skip-body" and value.strip() == "yes":
            self.skip_body = True
        return Milter.CONTINUE

    def body(self, chunk: bytes) -> int:
        self.chunks.append(len(chunk))
        return Milter.SKIP if self.skip_body else Milter.CONTINUE

    def eom(self) -> int:
        self.progress()
        self.addheader("X-Added", "appended at the end")
        self.addheader("X-Inserted", "inserted at the top", 0)
        self.chgheader("Subject", 1, "changed subject")
        self.chgheader("X-Remove-Me", 1, "")
        self.addrcpt("<added@example.jp>")
        self.addrcpt("<added-par@example.jp>", "NOTIFY=NEVER")
        self.delrcpt("<gone@example.jp>")
        self.chgfrom("<new-sender@example.jp>")
        self.addheader("X-Seen-Chunks", ",".join(map(str, self.chunks)) or "none")
        self.addheader("X-Seen-Macros", " ".join(self.macros_seen) or "none")
        self.replacebody(b"replaced body\r\n")
        self.quarantine("held for review")
        return Milter.CONTINUE


if __name__ == "__main__":
    Milter.factory = ActionMilter
    Milter.runmilter("action-milter", sys.argv[1], 60)

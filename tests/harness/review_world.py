"""What the review tests through `mailmoat serve` share: the parties, a gateway with the
review and attachments milters whose relay domains include the outside customer, and how a
message at the sink is told apart (the message itself, a review notice, a ZIP password)."""
from __future__ import annotations

import email
import time
from contextlib import contextmanager
from email import policy as email_policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Iterator

from milters.core.review import SqliteReviewBook
from tests.harness.bounded import wait_until
from tests.harness.browser import console_up
from tests.harness.ports import free_port
from tests.harness.milter_proc import ROOT
from tests.harness.sink import SinkMessage, SmtpSink

SAMPLE = ROOT / "samples" / "ppap-attachment-ja.eml"
SENDER, OUTSIDE, BOSS = "hanako@example.jp", "buyer@customer.example", "boss@example.jp"
WAIT = 30.0


def review_behind_postfix(release_port: int, later_milters: str,
                          queue_run_delay: str = "1s") -> dict:  # type: ignore[type-arg]
    """PostfixInstance keywords for the recipe's review setup (docs/recipes/milters-behind-
    postfix.md): held mail leaves through a release port running `later_milters`, and the
    review header is removed when Postfix sends mail on."""
    return {
        "services": [f"127.0.0.1:{release_port} inet n - n - - smtpd"
                     f" -o smtpd_milters={later_milters}"
                     " -o milter_header_checks= -o content_filter="
                     " -o receive_override_options=no_address_mappings"],
        "extra": {"milter_header_checks": "regexp:{{/^X-Mailmoat-Review: / FILTER "
                                          f"smtp:[127.0.0.1]:{release_port}}}}}",
                  "smtp_header_checks": "regexp:{{/^X-Mailmoat-Review:/ IGNORE}}",
                  "queue_run_delay": queue_run_delay},
    }


def review_gateway(tmp_path: Path, sink: SmtpSink, policy: str, console_url: str,
                   extra: str = "", milters: tuple[str, ...] = ("review", "attachments")
                   ):  # type: ignore[no-untyped-def]
    """A Serve (not started) with `milters` (review, attachments) delivering to `sink`."""
    from tests.integration.test_serve import Serve  # the fixture module, imported late
    listed = ", ".join(f"{{name: {name}}}" for name in milters)
    serve = Serve(tmp_path, policy=policy, relay=f"smtp:[127.0.0.1]:{sink.port}",
                  milters=f"milters: [{listed}]\n"
                          f"review: {{console_url: \"{console_url}\", "
                          "token_key_file: var/review-key}\n" + extra)
    serve.config.write_text(serve.config.read_text().replace(
        "relay_domains: [example.jp]", "relay_domains: [example.jp, customer.example]"))
    return serve


@contextmanager
def gateway_with_console(tmp_path: Path, policy: str,
                         milters: tuple[str, ...] = ("review", "attachments")
                         ) -> Iterator[tuple[Any, SmtpSink, str]]:
    """review_gateway started with the console serve starts, once that answers: (serve, the
    sink, the console's base URL). No traceback may be left in serve's log."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with SmtpSink() as sink:
        serve = review_gateway(tmp_path, sink, policy, base,
                               f"console: {{listen: '127.0.0.1:{port}'}}\n", milters)
        serve.start()
        try:
            wait_until(lambda: console_up(base), WAIT, serve.text)
            yield serve, sink, base
        finally:
            serve.stop()
    assert "Traceback" not in serve.text()


def parsed(item: SinkMessage) -> EmailMessage:
    message = email.message_from_bytes(item.data, policy=email_policy.default)
    assert isinstance(message, EmailMessage)
    return message


def kind_of(item: SinkMessage) -> str:
    """outside (the message itself), review (a review notice), password (the ZIP's)."""
    if OUTSIDE in item.rcpt_tos:
        return "outside"
    return "review" if "mailmoat-review" in str(parsed(item).get("From", "")) else "password"


def kinds(sink: SmtpSink) -> list[str]:
    return sorted(kind_of(item) for item in sink.messages)


def settle(serve, pattern: str, rounds: int = 3) -> None:  # type: ignore[no-untyped-def]
    """Wait for `pattern`, then let serve's runner go a few more rounds (about a second
    each): a second release or notice would show in the sink by then."""
    serve.wait_log(pattern, timeout=WAIT)
    time.sleep(rounds * 1.2)


def book_of(serve) -> SqliteReviewBook:  # type: ignore[no-untyped-def]
    return SqliteReviewBook(str(serve.dir / "state-review.db"))

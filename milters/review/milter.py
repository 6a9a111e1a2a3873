"""The review milter daemon: the shared checker milter over logic.ReviewChecker. Notices go
to the config's re-injection listener (gateway.reinject_listen), like the attachments
milter's password notices; the review book, tokens and notices come from
milters.core.review, imported when the logic is built."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from milters.core.account_roles import role_addresses
from milters.core.checker_milter import CheckerLogic, serve_checker
from milters.core.config import GatewayConfig
from milters.core.directory import open_directory
from milters.core.milter_protocol import ActionFlag, MacroStage
from milters.core.policy.document import Policy

from .logic import ReviewChecker, ReviewKit


class ReviewLogic(CheckerLogic):
    name = "review"
    # Hold (quarantine), add X-Mailmoat-Review, remove a client's forged one.
    actions = ActionFlag.ADDHDRS | ActionFlag.CHGHDRS | ActionFlag.QUARANTINE
    spool_body = True  # attachments are only listed, never held whole in memory
    macros = {
        MacroStage.ENVFROM: ("i", "{auth_authen}"),
        MacroStage.EOM: ("i",),
    }


def build_checker(config: GatewayConfig) -> ReviewChecker:
    """The logic over the real book, notices and tokens (`review:` in the gateway config)."""
    from milters.core import review  # noqa: PLC0415 -- the book's libraries: this process only

    key = review.load_token_key(config.review.token_key_file)
    url = review.console_url(config)
    notices = review.notices_for(config)

    def issue_link(review_id: str, person: str, action: str, expires: float) -> str:
        return review.link(url, review.issue(key, review_id, person, action, expires))

    kit = ReviewKit(book=review.open_review_book(config), new_review=review.new_review,
                    render_for_sender=notices.render_for_sender,
                    render_for_approver=notices.render_for_approver,
                    issue_link=issue_link, reason_prefix=review.REVIEW_REASON_PREFIX,
                    role_addresses=lambda role: role_addresses(config.console.users_file,
                                                               role),
                    directory=open_directory(config))
    return ReviewChecker(config.hostname, config.reinject_listen, kit)


def serve(config: GatewayConfig, listen: str,
          load_policy: Callable[[Path], Policy]) -> None:
    checker = build_checker(config)  # a bad key file or book is refused before listening
    serve_checker(ReviewLogic, lambda: checker, config.policy, listen, load_policy)

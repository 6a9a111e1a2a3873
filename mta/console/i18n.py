"""The console's Japanese and English strings, and which language a request gets.

A small catalog, not gettext: two languages and a few dozen strings, each key with both
texts side by side so a missing translation is seen in review (and caught by a test).
Order of choice: the user's own switch, then `console.language`, then Accept-Language.
"""
from __future__ import annotations

LANGUAGES = ("ja", "en")
DEFAULT = "en"
MAX_HEADER = 1024  # of Accept-Language read: a 1 MB header costs what a short one does
MAX_ITEMS = 16

CATALOG: dict[str, dict[str, str]] = {
    "title": {"en": "mailmoat console", "ja": "mailmoat コンソール"},
    "nav.held": {"en": "Held mail", "ja": "保留メール"},
    "nav.audit": {"en": "Audit", "ja": "監査ログ"},
    "nav.overview": {"en": "Overview", "ja": "概要"},
    "nav.logout": {"en": "Log out", "ja": "ログアウト"},
    "nav.language": {"en": "日本語", "ja": "English"},
    "login.heading": {"en": "Log in", "ja": "ログイン"},
    "login.name": {"en": "User name", "ja": "ユーザー名"},
    "login.password": {"en": "Password", "ja": "パスワード"},
    "login.submit": {"en": "Log in", "ja": "ログイン"},
    "login.refused": {"en": "Wrong user name or password.",
                      "ja": "ユーザー名またはパスワードが違います。"},
    "login.throttled": {"en": "Too many attempts; try again in {seconds} seconds.",
                        "ja": "試行回数が多すぎます。{seconds} 秒後にもう一度お試しください。"},
    "login.expired": {"en": "Your session ended; please log in again.",
                      "ja": "セッションが終了しました。もう一度ログインしてください。"},
    "login.unavailable": {"en": "Login is not available right now; see the gateway's log.",
                          "ja": "現在ログインできません。ゲートウェイのログを確認してください。"},
    "logged_in_as": {"en": "Logged in as {name} ({role})",
                     "ja": "{name} としてログイン中（{role}）"},
    "role.admin": {"en": "administrator", "ja": "管理者"},
    "role.auditor": {"en": "auditor", "ja": "監査者"},
    "role.user": {"en": "user", "ja": "利用者"},
    "page.unavailable": {"en": "This page is not available yet on this gateway.",
                         "ja": "このページはまだ利用できません。"},
    "error.forbidden": {"en": "This request was refused (the form had expired or was not "
                              "ours). Reload the page and try again.",
                        "ja": "このリクエストは拒否されました（フォームの期限切れ、または外部からの"
                              "送信）。ページを再読み込みしてやり直してください。"},
    "error.not_found": {"en": "Not found.", "ja": "見つかりません。"},
    # -- held mail (held_pages.py, held.html, message.html) ----------------------------
    "held.search": {"en": "Search", "ja": "検索"},
    "held.search_button": {"en": "Search", "ja": "検索"},
    "held.reason": {"en": "Reason", "ja": "保留理由"},
    "held.reason_all": {"en": "All reasons", "ja": "すべての理由"},
    "held.none": {"en": "No held mail.", "ja": "保留中のメールはありません。"},
    "held.count": {"en": "{total} held messages; {first}-{last} shown.",
                   "ja": "保留中 {total} 通（{first}〜{last} 通目を表示）"},
    "held.col.received": {"en": "Received", "ja": "受信日時"},
    "held.col.sender": {"en": "Sender", "ja": "送信者"},
    "held.col.recipients": {"en": "Recipients", "ja": "宛先"},
    "held.col.subject": {"en": "Subject", "ja": "件名"},
    "held.col.size": {"en": "Size", "ja": "サイズ"},
    "held.col.why": {"en": "Why held", "ja": "保留理由"},
    "held.no_subject": {"en": "(no subject)", "ja": "（件名なし）"},
    "held.select_all": {"en": "Select all", "ja": "すべて選択"},
    "held.bulk_release": {"en": "Release selected", "ja": "選択したメールを配送"},
    "held.bulk_delete": {"en": "Delete selected", "ja": "選択したメールを削除"},
    "held.prev": {"en": "Previous", "ja": "前へ"},
    "held.next": {"en": "Next", "ja": "次へ"},
    "held.done.released": {"en": "Released: the message is on its way.",
                           "ja": "配送しました。"},
    "held.done.released_partly": {"en": "Released to the chosen recipients; the others "
                                        "stay held.",
                                  "ja": "選択した宛先へ配送しました。残りの宛先は保留のままです。"},
    "held.done.deleted": {"en": "Deleted.", "ja": "削除しました。"},
    "held.done.bulk": {"en": "{ok} done, {failed} failed.",
                       "ja": "{ok} 通完了、{failed} 通失敗。"},
    "held.error.bad_request": {"en": "This request cannot be done.",
                               "ja": "この操作は実行できません。"},
    "held.error.forbidden": {"en": "Your role may not do this.",
                             "ja": "この操作を行う権限がありません。"},
    "held.error.too_large": {"en": "The request is too large.",
                             "ja": "リクエストが大きすぎます。"},
    "held.error.failed": {"en": "The operation failed; see the gateway's log.",
                          "ja": "操作に失敗しました。ゲートウェイのログを確認してください。"},
    "message.back": {"en": "Back to held mail", "ja": "保留メール一覧へ戻る"},
    "message.queue_id": {"en": "Queue ID", "ja": "キューID"},
    "message.not_held": {"en": "not held", "ja": "保留されていません"},
    "message.release_all": {"en": "Release to all recipients", "ja": "すべての宛先へ配送"},
    "message.release_some": {"en": "Release to some recipients",
                             "ja": "一部の宛先へ配送"},
    "message.release_chosen": {"en": "Release to the chosen", "ja": "選択した宛先へ配送"},
    "message.delete": {"en": "Delete", "ja": "削除"},
    "message.download": {"en": "Download the original (.eml)",
                         "ja": "元のメールをダウンロード（.eml）"},
    "message.auth_results": {"en": "Authentication results", "ja": "認証結果"},
    "message.text": {"en": "Text", "ja": "本文"},
    "message.html_as_text": {"en": "HTML shown as text", "ja": "HTML をテキストで表示"},
    "message.truncated": {"en": "truncated", "ja": "省略あり"},
    "message.no_text": {"en": "No text part.", "ja": "本文パートはありません。"},
    "message.attachments": {"en": "Attachments", "ja": "添付ファイル"},
    "message.no_attachments": {"en": "No attachments.", "ja": "添付ファイルはありません。"},
    "message.file_name": {"en": "File name", "ja": "ファイル名"},
    "message.content_type": {"en": "Type", "ja": "種類"},
    "message.headers": {"en": "Header fields", "ja": "ヘッダー"},
    "message.story": {"en": "What happened to it", "ja": "処理の記録"},
    "message.no_story": {"en": "No audit records for this message.",
                         "ja": "このメールの監査記録はありません。"},
    "message.event": {"en": "Event", "ja": "イベント"},
    "message.actor": {"en": "By", "ja": "実行者"},
    "message.fields": {"en": "Details", "ja": "詳細"},
    # -- audit and overview (audit_pages.py, overview_pages.py, audit*.html, overview.html)
    "audit.queue_id": {"en": "Queue ID", "ja": "キューID"},
    "audit.message_id": {"en": "Message-ID", "ja": "Message-ID"},
    "audit.address": {"en": "Address", "ja": "アドレス"},
    "audit.text": {"en": "Any text", "ja": "キーワード"},
    "audit.since": {"en": "From", "ja": "開始日"},
    "audit.until": {"en": "To", "ja": "終了日"},
    "audit.event": {"en": "Event", "ja": "イベント"},
    "audit.event_all": {"en": "All events", "ja": "すべてのイベント"},
    "audit.time": {"en": "Time", "ja": "日時"},
    "audit.source": {"en": "From address", "ja": "接続元"},
    "audit.none": {"en": "No matching records.", "ja": "該当する記録はありません。"},
    "audit.count": {"en": "{count} records, newest first.",
                    "ja": "{count} 件（新しい順）"},
    "audit.more": {"en": "Only the newest {limit} are shown; narrow the search.",
                   "ja": "新しい {limit} 件のみ表示しています。条件を絞り込んでください。"},
    "audit.back": {"en": "Back to the audit search", "ja": "監査ログの検索へ戻る"},
    "audit.story_of": {"en": "The story of {queue_id}", "ja": "{queue_id} の処理記録"},
    "audit.verify": {"en": "Verify the hash chain", "ja": "ハッシュチェーンを検証"},
    "audit.intact": {"en": "Chain intact: {checked} records checked.",
                     "ja": "チェーンは改ざんされていません（{checked} 件を検証）。"},
    "audit.broken": {"en": "Record {seq}: {reason}.",
                     "ja": "記録 {seq}: ハッシュが一致しません（変更または削除されています）。"},
    "audit.no_log": {"en": "No audit log is configured on this gateway.",
                     "ja": "このゲートウェイでは監査ログが設定されていません。"},
    "audit.tip": {"en": "Last record", "ja": "最新の記録"},
    "audit.tip_hint": {"en": "Note this number and hash somewhere else: a later check must "
                             "still find them.",
                       "ja": "この番号とハッシュを別の場所に控えてください。後の検証でも同じ記録が"
                             "見つかるはずです。"},
    "audit.bad_request": {"en": "This search cannot be done.",
                          "ja": "この条件では検索できません。"},
    "audit.forbidden": {"en": "Your role may not do this.",
                        "ja": "この操作を行う権限がありません。"},
    "audit.verify_busy": {"en": "A chain check is running; try again when it ends.",
                          "ja": "検証を実行中です。終了後にもう一度お試しください。"},
    "overview.hour": {"en": "Per hour, last 48 hours", "ja": "1 時間ごと（直近 48 時間）"},
    "overview.day": {"en": "Per day, last 30 days", "ja": "1 日ごと（直近 30 日）"},
    "overview.utc_days": {"en": "Days are UTC days.", "ja": "日付は UTC で区切っています。"},
    "overview.numbers": {"en": "The numbers", "ja": "数値"},
    "overview.bucket": {"en": "From", "ja": "開始"},
    "overview.total": {"en": "Total", "ja": "合計"},
    "overview.top_sources": {"en": "Top sources (rate limit points)",
                             "ja": "送信元の上位（レート制限ポイント）"},
    "overview.ip": {"en": "Address", "ja": "IP アドレス"},
    "overview.points": {"en": "Points", "ja": "ポイント"},
    "overview.updated": {"en": "Last seen", "ja": "最終更新"},
    "overview.no_sources": {"en": "No rate limit points recorded.",
                            "ja": "レート制限のポイントは記録されていません。"},
    "overview.forbidden": {"en": "The overview is for administrators and auditors.",
                           "ja": "概要は管理者と監査者のみ閲覧できます。"},
    "series.received": {"en": "Received", "ja": "受信"},
    "series.rejected": {"en": "Rejected", "ja": "拒否"},
    "series.held": {"en": "Held", "ja": "保留"},
    "series.encrypted": {"en": "Encrypted", "ja": "暗号化"},
    "series.neutralized": {"en": "Neutralized", "ja": "無害化"},
    "series.delivered": {"en": "Delivered", "ja": "配送"},
    "series.bounced": {"en": "Bounced", "ja": "不達"},
    # -- outbound review (review_pages.py, review*.html, reviews.html) --------------------
    "nav.reviews": {"en": "Reviews", "ja": "送信確認"},
    "review.heading": {"en": "Outbound mail review", "ja": "送信メールの確認"},
    "review.link_for": {"en": "This link is for {person}.", "ja": "このリンクは {person} 宛てです。"},
    "review.sender": {"en": "Sender", "ja": "送信者"},
    "review.recipients": {"en": "Recipients", "ja": "宛先"},
    "review.subject": {"en": "Subject", "ja": "件名"},
    "review.attachments": {"en": "Attachments", "ja": "添付ファイル"},
    "review.size": {"en": "Size", "ja": "サイズ"},
    "review.kind": {"en": "Review", "ja": "確認の種類"},
    "review.kind.delay": {"en": "Delayed sending", "ja": "送信保留"},
    "review.kind.confirm": {"en": "Sender's confirmation", "ja": "送信者の確認"},
    "review.kind.approve": {"en": "Approval", "ja": "承認"},
    "review.deadline": {"en": "Until", "ja": "期限"},
    "review.approver": {"en": "Approver", "ja": "承認者"},
    "review.reason": {"en": "Reason (sent to the sender)", "ja": "理由（送信者に通知されます）"},
    "review.nothing_yet": {"en": "Nothing has been done yet: only the button above decides.",
                           "ja": "まだ何も実行されていません。上のボタンを押すと確定します。"},
    "review.action.send_now": {"en": "Send now", "ja": "今すぐ送信"},
    "review.action.cancel": {"en": "Cancel sending", "ja": "送信を取り消す"},
    "review.action.confirm": {"en": "Confirm and send", "ja": "確認して送信"},
    "review.action.approve": {"en": "Approve", "ja": "承認する"},
    "review.action.reject": {"en": "Reject", "ja": "却下する"},
    "review.explain.send_now": {"en": "The message is sent at once, without waiting.",
                                "ja": "待たずにすぐ送信します。"},
    "review.explain.cancel": {"en": "The message is not sent and is deleted.",
                              "ja": "メールは送信されず、削除されます。"},
    "review.explain.confirm": {"en": "You confirm the recipients; the message is sent.",
                               "ja": "宛先を確認したうえで送信します。"},
    "review.explain.approve": {"en": "The message is sent to its recipients.",
                               "ja": "メールを宛先へ送信します。"},
    "review.explain.reject": {"en": "The message is not sent; the sender gets your reason.",
                              "ja": "メールは送信されず、送信者に理由が通知されます。"},
    "review.state.pending": {"en": "Waiting for a decision.", "ja": "判断待ちです。"},
    "review.state.sent": {"en": "Done: the message is being sent.",
                          "ja": "完了しました。メールを送信します。"},
    "review.state.approved": {"en": "Approved: the message is being sent.",
                              "ja": "承認しました。メールを送信します。"},
    "review.state.cancelled": {"en": "Cancelled: the message will not be sent.",
                               "ja": "取り消しました。メールは送信されません。"},
    "review.state.rejected": {"en": "Rejected: the message will not be sent.",
                              "ja": "却下しました。メールは送信されません。"},
    "review.state.expired": {"en": "Expired: the message was not sent.",
                             "ja": "期限切れのため、メールは送信されませんでした。"},
    "review.refused.invalid": {"en": "This link is not valid: it was altered or was not made "
                                     "by this gateway.",
                               "ja": "このリンクは無効です（改変されたか、このゲートウェイが発行したもの"
                                     "ではありません）。"},
    "review.refused.expired": {"en": "This link has expired; the review is no longer "
                                     "waiting for a decision.",
                               "ja": "このリンクは有効期限が切れています。"},
    "review.refused.used": {"en": "This link was already used.",
                            "ja": "このリンクは使用済みです。"},
    "review.refused.decided": {"en": "This message was already decided.",
                               "ja": "このメールはすでに処理済みです。"},
    "review.refused.unknown": {"en": "No such review.", "ja": "該当する確認依頼はありません。"},
    "review.refused.not_yours": {"en": "This decision is not yours to take.",
                                 "ja": "この操作を行う権限がありません。"},
    "review.refused.self_approval": {"en": "The sender may not approve their own message.",
                                     "ja": "送信者は自分のメールを承認できません。"},
    "review.refused.form": {"en": "This form was not this page's; open the link again.",
                            "ja": "フォームが無効です。リンクを開き直してください。"},
    "review.refused.bad": {"en": "This request cannot be done.",
                           "ja": "このリクエストは実行できません。"},
    "review.refused.unavailable": {"en": "Reviews are not available on this console.",
                                   "ja": "このコンソールでは送信確認を利用できません。"},
    "reviews.as_sender": {"en": "Your messages waiting", "ja": "保留中の自分のメール"},
    "reviews.as_approver": {"en": "Waiting for your approval", "ja": "あなたの承認待ち"},
    "reviews.everyone": {"en": "All pending reviews", "ja": "保留中のすべての確認依頼"},
    "reviews.none": {"en": "None.", "ja": "ありません。"},
    "reviews.decide": {"en": "Decide", "ja": "操作"},
}


def text(key: str, language: str, **values: object) -> str:
    entry = CATALOG[key]
    message = entry.get(language) or entry[DEFAULT]
    return message.format(**values) if values else message


def from_accept_language(header: str | None) -> str | None:
    """The first of our languages the browser asks for, by q value (RFC 9110 12.5.4); None
    when it asks for none of them. Malformed items are skipped, never an error."""
    if not header:
        return None
    best: tuple[float, int, str] | None = None
    for position, item in enumerate(header[:MAX_HEADER].split(",")[:MAX_ITEMS]):
        tag, _, params = item.strip().partition(";")
        language = tag.strip().lower().split("-", 1)[0]
        if language not in LANGUAGES:
            continue
        quality = 1.0
        name, _, value = params.strip().partition("=")
        if name.strip().lower() == "q":
            try:
                quality = float(value.strip()[:5])
            except ValueError:
                continue
            if not 0.0 < quality <= 1.0:  # q=0 is "not this one"; nan and inf are nonsense
                continue
        candidate = (-quality, position, language)
        if best is None or candidate < best:
            best = candidate
    return best[2] if best else None


def choose(user_choice: str | None, setting: str, accept_language: str | None) -> str:
    if user_choice in LANGUAGES:
        return user_choice  # type: ignore[return-value]
    if setting in LANGUAGES:
        return setting
    return from_accept_language(accept_language) or DEFAULT

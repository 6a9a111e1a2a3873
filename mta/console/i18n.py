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

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

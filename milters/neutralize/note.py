"""What the recipient is told: a short text part listing every change and why, and the
marker header's summary."""
from __future__ import annotations

from dataclasses import dataclass, field

from milters.core.mime.stream import NewPart, base64_lines

_TEXT = {
    "en": {
        "intro": "mailmoat changed this message before delivering it, because its sender could "
                 "not be trusted ({why}).",
        "links": "{count} link(s) were disabled. They are shown like hxxps://example[.]com: "
                 "copy one by hand only if you are sure of it.",
        "warning": "Warning: {text}.",
        "html": "The formatted (HTML) part was {how}.",
        "sanitized": "cleaned: scripts, forms, remote pictures and links removed",
        "text_kept": "removed; the plain text version is kept",
        "to_text": "turned into plain text",
        "converted": "{name} was converted to {new}: pictures of its pages (or of the image), "
                     "with nothing in it that can run.",
        "dropped": "{name} was removed: {reason}.",
        "outro": "If you need the original, ask the sender to send it another way, or ask your "
                 "mail administrator (queue ID {queue_id}).",
    },
    "ja": {
        "intro": "送信者を確認できなかったため ({why})、mailmoat がこのメールを無害化して配送しました。",
        "links": "{count} 個のリンクを無効にしました。hxxps://example[.]com のように表示されています。"
                 "確かなものだけを手で入力してください。",
        "warning": "注意: {text}",
        "html": "HTML 部分は{how}。",
        "sanitized": "スクリプト・フォーム・外部画像・リンクを取り除いて表示しています",
        "text_kept": "削除し、テキスト版を残しました",
        "to_text": "テキストに変換しました",
        "converted": "{name} は {new} に変換しました (ページまたは画像を画像化したもので、"
                     "実行される内容は含まれません)。",
        "dropped": "{name} を削除しました: {reason}",
        "outro": "元のファイルが必要な場合は、送信者に別の方法での送付を依頼するか、"
                 "メール管理者にお問い合わせください (キューID {queue_id})。",
    },
}


@dataclass
class Changes:
    """Everything done to one message."""

    links: int = 0
    warnings: list[str] = field(default_factory=list)
    html: str = ""  # sanitized | text_kept | to_text
    converted: list[tuple[str, str]] = field(default_factory=list)  # (old name, new name)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (name, why)

    def warn(self, text: str) -> None:
        if text not in self.warnings and len(self.warnings) < 50:
            self.warnings.append(text)

    def any(self) -> bool:
        return bool(self.links or self.html or self.converted or self.dropped or self.warnings)

    def summary(self) -> str:
        """The marker header's value: what a filter rule or a script can read."""
        return (f"links={self.links}; converted={len(self.converted)}; "
                f"dropped={len(self.dropped)}" + (f"; html={self.html}" if self.html else ""))


def note_text(changes: Changes, language: str, why: str, queue_id: str) -> str:
    words = _TEXT[language]
    lines = [words["intro"].format(why=why), ""]
    if changes.links:
        lines.append("- " + words["links"].format(count=changes.links))
    lines += ["  " + words["warning"].format(text=w) for w in changes.warnings]
    if changes.html:
        lines.append("- " + words["html"].format(how=words[changes.html]))
    lines += ["- " + words["converted"].format(name=old, new=new)
              for old, new in changes.converted]
    lines += ["- " + words["dropped"].format(name=name, reason=reason)
              for name, reason in changes.dropped]
    lines += ["", words["outro"].format(queue_id=queue_id or "-")]
    return "\r\n".join(lines) + "\r\n"


def note_part(text: str) -> NewPart:
    import io
    header = (b"Content-Type: text/plain; charset=\"utf-8\"\r\n"
              b"Content-Disposition: inline; filename=\"mailmoat-note.txt\"\r\n"
              b"Content-Transfer-Encoding: base64\r\n\r\n")
    return NewPart(header, b"".join(base64_lines(io.BytesIO(text.encode("utf-8")))))

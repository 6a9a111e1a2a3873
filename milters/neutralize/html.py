"""HTML bodies made inert: sanitised by nh3 (a maintained sanitiser: ammonia, in Rust), then
every remaining anchor turned into plain text with its URL shown defanged beside it; or the
whole part turned into text.

What survives: formatting tags, tables, inline styles without anything that loads from the
network, and pictures carried in the message itself (`cid:`). What goes: scripts, styles
sheets, forms, frames, objects, event handlers, remote images, `<base>`, `<meta>` refresh.
"""
from __future__ import annotations

import html
import re
from html.parser import HTMLParser

from .links import LinkReport, defang, defang_nested, defang_text, url_warnings

SAFE_TAGS = {
    "a", "abbr", "b", "bdi", "bdo", "blockquote", "br", "caption", "center", "cite", "code",
    "col", "colgroup", "dd", "del", "dfn", "div", "dl", "dt", "em", "font", "h1", "h2", "h3",
    "h4", "h5", "h6", "hr", "i", "img", "ins", "kbd", "li", "mark", "ol", "p", "pre", "q", "s",
    "samp", "small", "span", "strike", "strong", "sub", "sup", "table", "tbody", "td", "tfoot",
    "th", "thead", "time", "tr", "tt", "u", "ul", "var", "wbr",
}
# Removed with everything inside them (the rest of the unsafe tags keep their text).
DROP_WITH_CONTENT = {"script", "style", "noscript", "template", "title", "head", "textarea",
                     "select", "object", "applet", "iframe", "frameset", "svg", "math"}
SAFE_ATTRIBUTES = {
    "*": {"style", "title", "dir", "lang", "align", "valign", "width", "height", "bgcolor",
          "color", "border", "cellpadding", "cellspacing", "colspan", "rowspan", "face",
          "size"},
    "a": {"href"},
    "img": {"src", "alt"},
}
# CSS that reaches out: url(), @import, image-set(), old IE expression() and behaviours.
_CSS_FETCH = re.compile(r"(?i)url\s*\(|@import|image-set|expression\s*\(|behavio(u)?r\s*:|"
                        r"-moz-binding|\\")
_BLOCKS = {"p", "div", "br", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table",
           "blockquote", "pre", "hr", "dt", "dd"}


def _keeps(tag: str, attribute: str, value: str) -> bool:
    """The value checks nh3's tables cannot express, applied as the HTML is re-emitted."""
    if attribute == "style":
        return not _CSS_FETCH.search(value)
    if tag == "img" and attribute == "src":
        return value.lower().startswith("cid:")  # no remote images
    return True


def sanitize(markup: str) -> str:
    """Safe HTML with anchors still in it (made inert by inert_links), before the checks of
    `_keeps`. nh3 gets no `attribute_filter` callback: it would call into Python from the
    Rust side through PyGILState_Ensure, which picks the wrong thread state in a libmilter
    worker thread (pymilter makes its own per connection, and libmilter moves a connection
    between threads) and corrupted the interpreter under load."""
    import nh3  # loaded where used: only this milter needs it
    return nh3.clean(markup, tags=SAFE_TAGS, clean_content_tags=DROP_WITH_CONTENT,
                     attributes=SAFE_ATTRIBUTES, strip_comments=True, link_rel=None,
                     url_schemes={"http", "https", "mailto", "ftp", "cid"})


class _Rewriter(HTMLParser):
    """Re-emits sanitised HTML with each <a href> replaced by a <span> and, after its text,
    the URL defanged in brackets."""

    def __init__(self, report: LinkReport, defang_links: bool) -> None:
        super().__init__(convert_charrefs=True)
        self.report, self.defang_links = report, defang_links
        self.out: list[str] = []
        self.anchors: list[tuple[str, list[str]]] = []  # (href, text seen so far)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            href = next((v for k, v in attrs if k == "href" and v), "")
            self.anchors.append((href, []))
            self.out.append("<span>")
            return
        self.out.append(_tag(tag, attrs))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.out.append(_tag(tag, attrs))

    def handle_endtag(self, tag: str) -> None:
        if tag != "a":
            self.out.append(f"</{tag}>")
            return
        if not self.anchors:
            return
        href, text = self.anchors.pop()
        self.out.append("</span>")
        if href and not href.lower().startswith(("cid:", "#")):
            self._show(href, "".join(text))

    def _show(self, href: str, shown: str) -> None:
        for warning in url_warnings(href, shown):
            self.report.warn(warning)
        if href.lower().startswith("mailto:"):
            # The address stays readable (clients link bare addresses anyway); a URL in
            # its ?body= or ?subject= does not stay live.
            target = href[len("mailto:"):]
            if self.defang_links:
                target = defang_nested(target, self.report)
        else:
            self.report.defanged += 1
            target = defang(href, self.report) if self.defang_links else href
        self.out.append(f' <span style="color:#a00000">[{html.escape(target)}]</span>')

    def handle_data(self, data: str) -> None:
        for _, text in self.anchors:
            text.append(data)
        # Text that looks like a URL is linked by mail clients themselves: defanged too.
        shown = defang_text(data, self.report) if self.defang_links else data
        self.out.append(html.escape(shown, quote=False))

    def close(self) -> None:
        super().close()
        while self.anchors:  # an <a> left open by broken markup
            self.handle_endtag("a")


def _tag(tag: str, attrs: list[tuple[str, str | None]]) -> str:
    rendered = "".join(f' {name}="{html.escape(value or "")}"' for name, value in attrs
                       if _keeps(tag, name, value or ""))
    return f"<{tag}{rendered}>"


def inert_html(markup: str, report: LinkReport, defang_links: bool = True,
               banner: str = "") -> str:
    """The part's new HTML: sanitised, no live link, the banner (escaped) on top."""
    rewriter = _Rewriter(report, defang_links)
    rewriter.feed(sanitize(markup))
    rewriter.close()
    top = (f'<p style="border:1px solid #a00000;padding:4px;color:#a00000">'
           f'{html.escape(banner)}</p>\r\n' if banner else "")
    return ('<!DOCTYPE html>\r\n<html><head><meta charset="utf-8"></head><body>\r\n'
            + top + "".join(rewriter.out) + "\r\n</body></html>\r\n")


class _TextMaker(HTMLParser):
    def __init__(self, report: LinkReport) -> None:
        super().__init__(convert_charrefs=True)
        self.report = report
        self.out: list[str] = []
        self.skip = 0
        self.anchors: list[tuple[str, list[str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in DROP_WITH_CONTENT:
            self.skip += 1
        elif tag == "a":
            self.anchors.append((next((v for k, v in attrs if k == "href" and v), ""), []))
        elif tag in _BLOCKS:
            self.out.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in DROP_WITH_CONTENT:
            self.skip = max(0, self.skip - 1)
        elif tag == "a" and self.anchors:
            href, text = self.anchors.pop()
            if href.lower().startswith(("http://", "https://", "ftp://", "mailto:")):
                for warning in url_warnings(href, "".join(text)):
                    self.report.warn(warning)
                self.out.append(f" [{href}]")
        elif tag in _BLOCKS:
            self.out.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skip:
            for _, text in self.anchors:
                text.append(data)
            self.out.append(re.sub(r"\s+", " ", data))


def html_to_text(markup: str, report: LinkReport, defang_links: bool = True) -> str:
    """The text a reader would see, each link's target in brackets after its text."""
    maker = _TextMaker(report)
    maker.feed(markup)
    maker.close()
    text = "".join(maker.out)
    text = "\n".join(line.strip() for line in text.splitlines())
    text = re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"
    return defang_text(text, report) if defang_links else text

"""Links made harmless: text URLs defanged, HTML sanitised with every live link gone (checked
by parsing the output, not by searching strings), and the look-alike lures named."""
from __future__ import annotations

from html.parser import HTMLParser

import pytest

from milters.neutralize.html import html_to_text, inert_html
from milters.neutralize.links import LinkReport, defang, defang_text, url_warnings
from tests.harness.live_urls import live_in_text


@pytest.mark.parametrize("url, expected", [
    ("https://example.com/path", "hxxps://example[.]com/path"),
    ("http://a.b.example:8080/x.y?q=1.2", "hxxp://a[.]b[.]example:8080/x.y?q=1.2"),
    ("ftp://files.example/a", "fxp://files[.]example/a"),
    ("https://bank.example@evil.example/", "hxxps://bank[.]example[@]evil[.]example/"),
    ("www.example.co.jp", "www[.]example[.]co[.]jp"),
    ("https://example.com?next=a.b", "hxxps://example[.]com?next=a.b"),
])
def test_defang(url: str, expected: str) -> None:
    assert defang(url) == expected


def test_text_urls_are_defanged_and_sentence_punctuation_kept() -> None:
    report = LinkReport()
    text = ("Log in at https://www.example.com/a?b=c. Or (see http://x.example/y) "
            "and www.foo.example, 詳細は https://例え.jp/ページ。")
    out = defang_text(text, report)
    assert out == ("Log in at hxxps://www[.]example[.]com/a?b=c. Or (see hxxp://x[.]example/y) "
                   "and www[.]foo[.]example, 詳細は hxxps://例え[.]jp/ページ。")
    assert report.defanged == 4


def test_text_already_defanged_is_left_alone() -> None:
    report = LinkReport()
    assert defang_text("hxxps://evil[.]example/x", report) == "hxxps://evil[.]example/x"
    assert report.defanged == 0


@pytest.mark.parametrize("url, shown, expected", [
    ("https://bank.example@evil.example/login", "", "looks like bank.example but leads to "
                                                    "evil.example"),
    ("https://xn--pple-43d.com/", "", "punycode: xn--pple-43d.com (shows as аpple.com)"),
    ("https://аpple.com/", "", "non-Latin letters: аpple.com (really xn--pple-43d.com)"),
    ("https://evil.example/login", "https://bank.example/login",
     "text shows bank.example but leads to evil.example"),
])
def test_lures_are_named(url: str, shown: str, expected: str) -> None:
    assert any(expected in warning for warning in url_warnings(url, shown))


def test_same_site_text_is_not_a_lure() -> None:
    assert url_warnings("https://login.bank.example/x", "www.bank.example") == []
    assert url_warnings("https://www.example.co.jp/", "example.co.jp") == []


class _Live(HTMLParser):
    """Everything in parsed HTML that could run or fetch."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag in ("script", "style", "iframe", "form", "input", "object", "embed", "base",
                   "link", "frame", "svg"):
            self.found.append(f"<{tag}>")
        if tag == "meta" and any(name == "http-equiv" for name, _ in attrs):
            self.found.append("<meta http-equiv>")
        for name, value in attrs:
            value = (value or "").strip().lower()
            if name.startswith("on"):
                self.found.append(f"{tag}@{name}")
            if name in ("href", "action", "formaction", "background", "poster", "srcset"):
                self.found.append(f"{tag}@{name}={value}")
            if name == "src" and not value.startswith("cid:"):
                self.found.append(f"{tag}@src={value}")
            if name == "style" and ("url(" in value or "import" in value):
                self.found.append(f"{tag}@style={value}")


TRICKS = """<html><head><title>t</title>
<style>body{background:url(https://track.example/bg.png)}</style>
<base href="https://evil.example/"><meta http-equiv="refresh" content="0;url=https://evil.example">
<link rel="stylesheet" href="https://evil.example/x.css"></head>
<body onload="steal()" background="https://track.example/b.png">
<p style="color:red;background-image:url('https://track.example/p.gif')">Dear customer,</p>
<a href="https://evil.example/login">https://bank.example/login</a>
<a href="https://xn--pple-43d.com/">Apple ID</a>
<a href="https://bank.example@evil.example/">Your bank</a>
<a href="javascript:alert(1)">click</a> <a href="data:text/html,<script>x</script>">d</a>
<form action="https://evil.example/post"><input name="password"><button>Go</button></form>
<script>document.write('x')</script><iframe src="https://evil.example/f"></iframe>
<object data="https://evil.example/o.swf"></object><svg onload="x()"><a href="https://e.example/s">s</a></svg>
<img src="https://track.example/open.gif" onerror="x()"><img src="cid:logo@x" alt="logo">
<video poster="https://track.example/v.png"></video>
<div style="behavior:url(x.htc)">styled</div><!-- <a href="https://hidden.example"> -->
</body></html>"""


def test_html_tricks_leave_no_live_link_and_the_lures_are_warned_about() -> None:
    report = LinkReport()
    out = inert_html(TRICKS, report, banner="Links were disabled")
    parser = _Live()
    parser.feed(out)
    assert parser.found == []
    assert "img" in parser.tags  # the inline cid: picture stays
    assert "[hxxps://evil[.]example/login]" in out
    assert "Dear customer" in out and "Links were disabled" in out
    assert any("shows bank.example but leads to evil.example" in w for w in report.warnings)
    assert any("punycode" in w for w in report.warnings)
    assert any("looks like bank.example" in w for w in report.warnings)
    assert "https://" not in out.replace("hxxps://", "")


def test_html_to_text_shows_each_link_defanged_after_its_text() -> None:
    report = LinkReport()
    text = html_to_text(TRICKS, report)
    assert "<" not in text and "document.write" not in text and "background" not in text
    assert "https://bank.example/login" not in text
    assert "hxxps://bank[.]example/login [hxxps://evil[.]example/login]" in text
    assert any("punycode" in w for w in report.warnings)


def test_links_can_be_kept_while_the_html_is_still_sanitised() -> None:
    report = LinkReport()
    out = inert_html('<a href="https://ok.example/x">ok</a><script>x</script>', report,
                     defang_links=False)
    assert "<script" not in out and "[https://ok.example/x]" in out and "<a " not in out


# -- URLs inside URLs: every one defanged, checked by reading each token as a URL ----------
NESTED = [
    "https://a.example/r?u=http://evil.example/x",
    "https://a.example/r?u=http%3A%2F%2Fevil.example%2Fx",
    "https://a.example/r?u=http%253A%252F%252Fevil.example",  # encoded twice
    "https://a.example/r?u=HTTP%3a%2f%2f203.0.113.9%2f",  # an IP, lower-case escapes
    "https://a.example/r?u=www%2Eevil%2Eexample",
    "https://a.example/go/https://b.example/to/http://evil.example/",  # in the path
    "https://a.example/r#https://evil.example/",  # in the fragment
    "https://a.example/r?a=1&u=ftp://evil.example/f&b=2",
    "hxxps://a[.]example/r?u=https://evil.example/",  # a "defanged" lure carrying a live one
    "xhttps://evil.example/",  # no word boundary before the scheme
    "smb://files.evil.example/share",  # schemes other than the web's
    "https://a.example/?q=%22%3E%20https%3A%2F%2Fevil.example",  # decodes to a space before
    "(https://a.example/r?u=https://evil.example/).",
    "mailto:x@a.example?body=see%20https%3A%2F%2Fevil.example",
]


@pytest.mark.parametrize("text", NESTED)
def test_no_url_inside_another_stays_live(text: str) -> None:
    assert live_in_text(text), f"the checker sees nothing live in {text!r}"
    report = LinkReport()
    out = defang_text(text, report)
    assert live_in_text(out) == [], out
    assert report.defanged >= 1


def test_nested_urls_are_counted_each() -> None:
    report = LinkReport()
    out = defang_text("https://a.example/r?u=http%3A%2F%2Fb.example%2F%3Fv%3Dhttp%3A%2F%2Fc"
                      ".example", report)
    assert report.defanged == 3, out
    assert out == "hxxps://a[.]example/r?u=hxxp://b[.]example/?v=hxxp://c[.]example"


def test_a_deep_chain_of_nested_urls_is_bounded_and_defanged() -> None:
    text = "https://a.example/?u=" * 200 + "https://evil.example/"
    report = LinkReport()
    out = defang_text(text, report)
    assert live_in_text(out) == []


def test_html_anchors_carrying_urls_are_defanged_inside_too() -> None:
    report = LinkReport()
    out = inert_html('<a href="https://a.example/r?u=https%3A%2F%2Fevil.example">x</a>'
                     '<a href="mailto:x@a.example?body=http://evil.example/">m</a>', report)
    parser = _Live()
    parser.feed(out)
    assert parser.found == []
    assert "hxxps://evil[.]example" in out and "hxxp://evil[.]example/" in out
    text = html_to_text('<a href="https://a.example/r?u=https%3A%2F%2Fevil.example">x</a>',
                        LinkReport())
    assert live_in_text(text) == [], text


# -- generated: URLs wrapped in URLs, encoded any number of times, in any text --------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from urllib.parse import quote  # noqa: E402

_HOSTS = st.sampled_from(["evil.example", "a.b.example", "203.0.113.9", "xn--pple-43d.com",
                          "例え.jp", "www.evil.example"])
_SCHEMES = st.sampled_from(["http://", "https://", "HTTPS://", "ftp://", "smb://", "www."])


@st.composite
def _nested_url(draw: st.DrawFn, depth: int = 0) -> str:
    scheme = draw(_SCHEMES)
    host = draw(_HOSTS)
    url = (host if scheme == "www." and host.startswith("www.") else scheme + host) \
        + draw(st.sampled_from(["", "/", "/p", "/a.b/c"]))
    if depth < 4 and draw(st.booleans()):
        inner = draw(_nested_url(depth + 1))
        for _ in range(draw(st.integers(0, 3))):
            inner = quote(inner, safe=draw(st.sampled_from(["", "/", ":/"])))
        url += draw(st.sampled_from(["?u=", "?a=1&u=", "#", "/", "?next=", ";u="])) + inner
    return url


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_nested_url(), st.sampled_from(["", "see ", "(", "<", "x", "\u3000", "\"", "1", "http://",
                                      "%", "%20", "+", "-", ".", "%2F", "_", "@", "="]),
       st.sampled_from(["", ".", ")", ">", " end", "。", "\"", "&x", ":", "//",
                        "%20www.x.example", "+www.a.example"]))
def test_generated_nested_urls_never_stay_live(url: str, before: str, after: str) -> None:
    text = before + url + after
    report = LinkReport()
    out = defang_text(text, report)
    assert live_in_text(out) == [], (text, out)
    assert report.defanged >= 1 or not live_in_text(text)


@pytest.mark.parametrize("text, expected", [
    ("www.a.example?u=http://evil.example", "www[.]a[.]example?u=hxxp://evil[.]example"),
    ("hxxps://a[.]example?u=http://evil.example/x",
     "hxxps://a[.]example?u=hxxp://evil[.]example/x"),
    ("https://a.example#u=https://evil.example", "hxxps://a[.]example#u=hxxps://evil[.]example"),
    ("http://a.example;u=http://evil.example", "hxxp://a[.]example;u=hxxp://evil[.]example"),
    ("http://http://evil.example/", "hxxp://http[:]//evil.example/"),
    ("http://a.example:http://b.example", "hxxp://a[.]example:hxxp://b[.]example"),
])
def test_a_query_straight_after_the_host_is_still_read(text: str, expected: str) -> None:
    assert defang_text(text, LinkReport()) == expected


@pytest.mark.parametrize("text", ["a" * 2_000_000, "ab.c+" * 400_000, "://" * 700_000,
                                  "www." * 500_000, "http%3A%2F%2F" * 150_000,
                                  "http://a.example/" + "x" * 2_000_000])
def test_a_hostile_text_without_spaces_finishes(text: str) -> None:
    """2 MB in one word: a scan from every letter (quadratic) would take hours; the wait
    is bounded (60 s) instead of timed."""
    import threading
    done: list[str] = []
    worker = threading.Thread(target=lambda: done.append(defang_text(text, LinkReport())),
                              daemon=True)
    worker.start()
    worker.join(60)
    assert done, "the defanger did not finish within 60 s"
    assert live_in_text(done[0][:100_000]) == []

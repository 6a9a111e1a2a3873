"""ISO-2022-JP with Windows extensions: what Outlook sends must survive both ways."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from milters.core.jis import decode_cp50220, encode_cp50220


def test_windows_extensions_round_trip_and_use_jis_escapes() -> None:
    text = "㈱髙橋商事 ①見積書 ㍻ 﨑 ～ test"
    data = encode_cp50220(text)
    assert data.startswith(b"\x1b$B") and b"\x1b(B" in data
    assert all(byte < 0x80 for byte in data)  # 7bit, as ISO-2022-JP must be
    assert decode_cp50220(data) == text


def test_plain_jis_matches_pythons_codec() -> None:
    text = "山田様 いつもお世話になっております。"
    assert encode_cp50220(text) == text.encode("iso2022_jp")
    assert decode_cp50220(text.encode("iso2022_jp")) == text


def test_ibm_extension_goes_out_in_its_nec_selected_form() -> None:
    # 髙 is 0xFBFC (IBM) and 0xEEE0 (NEC-selected) in CP932; CP50220 sends row 92.
    assert encode_cp50220("髙") == b"\x1b$B" + bytes((0x7C, 0x62)) + b"\x1b(B"


# Characters CP932 maps one way only (¢ -> ￠ and the like) cannot round-trip by definition.
jis_chars = st.characters(codec="cp932", exclude_characters="\xa2\xa3\xac\u2016\u2212\u301c").filter(
    lambda c: len(c.encode("cp932")) == 2 or ord(c) < 0x80)


@given(st.text(alphabet=jis_chars, max_size=30))
def test_any_cp932_text_round_trips(text: str) -> None:
    assert decode_cp50220(encode_cp50220(text)) == text

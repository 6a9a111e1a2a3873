"""scripts/console_screenshots runs end to end (a gateway, its console, chromium) and
writes one valid 1280x800 PNG per main page; their pixels are not compared."""
from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from tests.harness.milter_proc import ROOT

pytestmark = pytest.mark.integration
PAGES = ("login", "held", "message", "audit-story", "overview")


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG whose every chunk's CRC is right (else AssertionError)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    offset, chunks = 8, []
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        body = data[offset + 8:offset + 8 + length]
        crc, = struct.unpack(">I", data[offset + 8 + length:offset + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r}"
        chunks.append((kind, body))
        offset += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    image = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    width, height = struct.unpack(">II", chunks[0][1][:8])
    assert len(image) > height  # the pixel data inflates (one filter byte a row at least)
    return width, height


def test_the_script_writes_a_valid_png_of_each_page(tmp_path: Path) -> None:
    out = tmp_path / "images"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "console_screenshots"),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(f"console-{p}.png" for p in PAGES)
    for page in PAGES:
        path = out / f"console-{page}.png"
        assert f"wrote {path}" in done.stdout
        assert png_size(path.read_bytes()) == (1280, 800), page


def test_the_docs_show_the_screenshots_that_are_committed() -> None:
    for page in PAGES:
        png_size((ROOT / "docs" / "images" / f"console-{page}.png").read_bytes())
    console = (ROOT / "docs" / "console.md").read_text()
    readme = (ROOT / "README.md").read_text()
    for page in ("held", "message", "audit-story", "overview"):
        assert f"images/console-{page}.png" in console, page
    assert "docs/images/console-" in readme

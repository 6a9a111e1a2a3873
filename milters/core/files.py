"""Small file helpers shared by everything that reloads a file when it changes."""
from __future__ import annotations

import os
from pathlib import Path


def file_signature(path: Path | str) -> tuple[int, int, int, int] | None:
    """What changes when a file is edited or replaced (inode, size, mtime, ctime); None if
    it cannot be read. Comparing signatures spots an edit without reading the file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

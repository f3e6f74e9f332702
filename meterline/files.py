"""Files that hold secrets (passwords, tokens, token hashes)."""
from __future__ import annotations

import os
from pathlib import Path


def write_private(path: Path, text: str) -> None:
    """Replace `path` atomically with `text`, readable by its owner only, whatever the umask or the mode of
    a leftover temporary file (os.open's mode applies only when it creates the file, hence the fchmod)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(fd, 0o600)
        out.write(text)
    tmp.replace(path)

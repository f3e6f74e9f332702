"""A bounded on-disk spool: where records wait while the broker is unreachable.

Layout: append-only segment files `<seq:016d>.seg` in one directory, oldest first.
Each record is framed as `<key_len u32><value_len u32><crc32 u32><key><value>`, so a
record torn by a crash is detected and the rest of that segment is skipped (counted).

Durability (fsync policy, `fsync=`):
  "segment" (default): fsync when a segment is sealed and on close. Records are written
      with unbuffered os.write, so a *process* crash loses nothing that was spooled; a
      *machine* crash may lose the unsynced tail of the active segment.
  "always": fsync after every record (survives power loss; ~ms per record).
  "never":  leave it to the OS.

Replay is segment by segment: the sender reads the oldest segment, produces every
record, and deletes the segment once each record was either delivered or spooled again
(a failed delivery appends it to the tail). Exactly once while the process lives; a
crash in the middle of a replay re-sends that segment (at-least-once, dedupe by event_id).

One process owns a spool directory at a time (an flock on `.lock`); a second process
with the same name gets `<name>.1`, `<name>.2`, ... and the next process to start adopts
(and replays) whatever a dead one left behind.
"""
from __future__ import annotations

import fcntl
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

HEADER = struct.Struct("<III")
FsyncPolicy = Literal["segment", "always", "never"]


class Spool:
    def __init__(self, directory: Path, max_bytes: int = 64 << 20, segment_bytes: int = 1 << 20, fsync: FsyncPolicy = "segment"):
        self.directory, self._lock_fd = _lock_free_directory(Path(directory))
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.corrupt_records = 0
        self._mutex = threading.Lock()
        self._segments = sorted(self.directory.glob("*.seg"))
        self._bytes = sum(p.stat().st_size for p in self._segments)
        self._active_fd: int | None = None
        self._active_size = 0

    # ---- writing ---------------------------------------------------------------------------

    def append(self, key: bytes, value: bytes, force: bool = False) -> bool:
        """Append one record; False (nothing written) when the spool is full, unless `force`."""
        frame = HEADER.pack(len(key), len(value), zlib.crc32(value, zlib.crc32(key))) + key + value
        with self._mutex:
            if self._bytes + len(frame) > self.max_bytes and not force:
                return False
            if self._active_fd is None or self._active_size + len(frame) > self.segment_bytes:
                self._rotate()
            os.write(self._active_fd, frame)
            if self.fsync == "always":
                os.fsync(self._active_fd)
            self._active_size += len(frame)
            self._bytes += len(frame)
            return True

    def _rotate(self) -> None:
        self._seal()
        seq = int(self._segments[-1].stem) + 1 if self._segments else 0
        path = self.directory / f"{seq:016d}.seg"
        self._active_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._active_size = 0
        self._segments.append(path)

    def _seal(self) -> None:
        if self._active_fd is not None:
            if self.fsync != "never":
                os.fsync(self._active_fd)
            os.close(self._active_fd)
            self._active_fd = None

    # ---- replay ----------------------------------------------------------------------------

    def __len__(self) -> int:
        """Bytes held (a cheap emptiness test: `if spool:`)."""
        return self._bytes

    @property
    def bytes(self) -> int:
        return self._bytes

    def oldest(self) -> tuple[Path, list[tuple[bytes, bytes]]] | None:
        """The oldest segment and its records (the active one is sealed first), or None."""
        with self._mutex:
            if not self._segments:
                return None
            if self._segments[0] == self._current_path():
                self._seal()
            path = self._segments[0]
        return path, list(self._read(path))

    def remove(self, path: Path) -> None:
        """Forget a replayed segment."""
        with self._mutex:
            size = path.stat().st_size
            path.unlink()
            self._segments.remove(path)
            self._bytes -= size

    def _current_path(self) -> Path | None:
        return self._segments[-1] if self._active_fd is not None else None

    def _read(self, path: Path) -> Iterator[tuple[bytes, bytes]]:
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            if pos + HEADER.size > len(data):
                self.corrupt_records += 1
                return
            klen, vlen, crc = HEADER.unpack_from(data, pos)
            start, end = pos + HEADER.size, pos + HEADER.size + klen + vlen
            key, value = data[start:start + klen], data[start + klen:end]
            if end > len(data) or zlib.crc32(value, zlib.crc32(key)) != crc:
                self.corrupt_records += 1  # a torn tail: nothing after it can be trusted
                return
            yield key, value
            pos = end

    def close(self) -> None:
        with self._mutex:
            self._seal()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _lock_free_directory(base: Path) -> tuple[Path, int]:
    """Take the first of base, base.1, base.2, ... that no live process holds."""
    for n in range(1024):
        candidate = base if n == 0 else base.with_name(f"{base.name}.{n}")
        candidate.mkdir(parents=True, exist_ok=True)
        fd = os.open(candidate / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return candidate, fd
    raise RuntimeError(f"no free spool directory next to {base}")

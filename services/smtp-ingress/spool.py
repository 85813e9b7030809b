"""Where the body of a message goes while it is read (issue 8.6): memory up to the inline
threshold, then an unnamed file in the spool directory, so a session holds at most the
threshold in memory however large its message, and the S3 upload streams from the file.

Two budgets per replica bound what all sessions hold: bytes in memory and bytes on disk. A
spool that finds no room in memory goes to disk early; one that finds no room on disk (or
cannot write there) refuses the write, and the session answers 451 4.3.1.

The files are opened with ``tempfile.TemporaryFile``: on Linux O_TMPFILE, never named, so
nothing is left behind whatever ends the session or the process; ``close`` gives back the
disk space and both budgets. Writes go to the page cache from the event loop, as Postfix
writes its queue files (a 256 KiB write takes tens of microseconds).
"""

from __future__ import annotations

import io
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO

from postbus.kit.logging import get_logger

log = get_logger(__name__)

PREFIX = "spool-"  # the name of a spool file on systems without O_TMPFILE (unlinked at once)


class Budget:
    """Bytes that all sessions of a replica may hold at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        """Count ``n`` more bytes; False (nothing counted) when they do not fit."""
        if n > 0 and self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


class SpoolDir:
    """The spool directory of one replica and its two budgets."""

    def __init__(self, path: Path, *, memory: Budget, disk: Budget) -> None:
        self.path = path
        self.memory = memory
        self.disk = disk
        self.open_files = 0

    def prepare(self) -> None:
        """At start: create the directory (private) and remove what a crash left there.
        Refuses a directory that is a symlink or someone else's (the default is in the
        shared temporary directory)."""
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(self.path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise RuntimeError(f"spool directory {self.path} is not a directory of this user")
        os.chmod(self.path, 0o700)
        for stale in self.path.glob(PREFIX + "*"):
            stale.unlink(missing_ok=True)
            log.info("stale spool file removed", path=str(stale))

    def open(self, threshold: int) -> Spool:
        return Spool(self, threshold)


class Spool:
    """The body of one message: written in pieces, read back once, then closed."""

    def __init__(self, where: SpoolDir, threshold: int) -> None:
        self._where = where
        self._threshold = threshold
        self._buf = bytearray()
        self._file: BinaryIO | None = None
        self.size = 0

    @property
    def on_disk(self) -> bool:
        return self._file is not None

    def write(self, data: bytes) -> bool:
        """Append ``data``; False when there is no room for it (then nothing more can be
        written: close the spool and refuse the message)."""
        n = len(data)
        if not n:
            return True
        where = self._where
        if self._file is None:
            if self.size + n <= self._threshold and where.memory.take(n):
                self._buf += data
                self.size += n
                return True
            # past the threshold, or no room in memory: from here on, the disk
            if not where.disk.take(self.size + n):
                return False
            try:
                self._file = tempfile.TemporaryFile(dir=where.path, prefix=PREFIX)
                where.open_files += 1
                self._file.write(self._buf)
                self._file.write(data)
            except OSError as exc:
                log.warning("cannot write spool", error=str(exc)[:200])
                where.disk.give(self.size + n)
                self._drop_file()
                return False
            where.memory.give(len(self._buf))
            self._buf = bytearray()
            self.size += n
            return True
        if not where.disk.take(n):
            return False
        try:
            self._file.write(data)
        except OSError as exc:
            log.warning("cannot write spool", error=str(exc)[:200])
            where.disk.give(n)
            return False
        self.size += n
        return True

    def contents(self) -> bytes:
        """The whole body (for one at most the inline threshold in size)."""
        if self._file is None:
            return bytes(self._buf)
        self._file.seek(0)
        return self._file.read()

    def reader(self) -> BinaryIO:
        """The body as a file, from its start."""
        if self._file is None:
            return io.BytesIO(self._buf)
        self._file.flush()
        self._file.seek(0)
        return self._file

    def close(self) -> None:
        """Give back the file and both budgets (idempotent)."""
        where = self._where
        if self._file is not None:
            where.disk.give(self.size)
            self._drop_file()
        else:
            where.memory.give(len(self._buf))
        self._buf = bytearray()
        self.size = 0

    def _drop_file(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
            self._where.open_files -= 1

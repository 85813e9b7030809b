"""smtp-ingress spool: memory up to the threshold, then an unnamed file; both budgets given
back on close; the directory prepared at start (issue 8.6)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from postbus.smtp_ingress.spool import PREFIX, Budget, SpoolDir


def spool_dir(tmp_path: Path, memory: int = 1000, disk: int = 10_000) -> SpoolDir:
    d = SpoolDir(tmp_path / "spool", memory=Budget(memory), disk=Budget(disk))
    d.prepare()
    return d


def test_memory_up_to_the_threshold_then_disk_and_all_given_back(tmp_path: Path) -> None:
    d = spool_dir(tmp_path)
    s = d.open(threshold=100)
    assert s.write(b"a" * 60) and s.write(b"b" * 40)
    assert not s.on_disk and d.memory.used == 100 and d.disk.used == 0
    assert s.write(b"c")  # past the threshold: everything moves to disk
    assert s.on_disk and d.memory.used == 0 and d.disk.used == 101 and d.open_files == 1
    assert not any(d.path.iterdir())  # the file has no name
    assert s.write(b"d" * 500)
    assert s.contents() == b"a" * 60 + b"b" * 40 + b"c" + b"d" * 500
    assert s.reader().read() == s.contents()
    s.close()
    s.close()  # idempotent
    assert (d.memory.used, d.disk.used, d.open_files, s.size) == (0, 0, 0, 0)


def test_no_room_in_memory_goes_to_disk_no_room_on_disk_refuses(tmp_path: Path) -> None:
    d = spool_dir(tmp_path, memory=50, disk=300)
    small = d.open(threshold=1000)
    assert small.write(b"x" * 40) and not small.on_disk
    other = d.open(threshold=1000)
    assert other.write(b"y" * 40) and other.on_disk  # memory budget used up: disk at once
    assert other.reader().read() == b"y" * 40
    assert not other.write(b"z" * 261)  # 40 + 261 > 300
    assert d.disk.used == 40
    other.close()
    small.close()
    assert (d.memory.used, d.disk.used, d.open_files) == (0, 0, 0)


def test_a_failing_disk_refuses_and_gives_back(tmp_path: Path) -> None:
    d = spool_dir(tmp_path)
    s = d.open(threshold=10)
    assert s.write(b"12345")
    d.path.rmdir()  # nowhere to write
    assert not s.write(b"x" * 20)
    assert d.disk.used == 0 and d.open_files == 0 and d.memory.used == 5
    s.close()
    assert d.memory.used == 0


def test_prepare_removes_stale_files_and_refuses_a_symlink(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    path.mkdir(mode=0o755)
    (path / (PREFIX + "left-by-a-crash")).write_bytes(b"x")
    (path / "not-ours").write_bytes(b"x")
    d = spool_dir(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == ["not-ours"]
    assert path.stat().st_mode & 0o777 == 0o700
    assert d.path == path
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(RuntimeError):
        SpoolDir(link, memory=Budget(1), disk=Budget(1)).prepare()
    assert os.path.isdir(link)

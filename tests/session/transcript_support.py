"""What the SMTP and POP3 transcript runners share: the walk through a transcript file,
the reply lines a session still owes, ``S:``/``S~`` matching and byte literals.

A transcript line is ``C: text`` (sent with CRLF appended), ``C< b"python bytes"`` (sent
as it is; ``+`` and ``* N`` allowed), ``S: line`` (the next reply line, exactly),
``S~ regex`` (the next reply line matches fully), ``@directive ...`` (the runner's own),
or a blank line or ``# comment``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import NoReturn

import pytest


def literal_bytes(expr: str) -> bytes:
    """A bytes literal, or literals joined with ``+`` and repeated with ``* N``."""
    tree = ast.parse(expr, mode="eval")
    allowed = (ast.Expression, ast.BinOp, ast.Add, ast.Mult, ast.Constant)
    assert all(isinstance(n, allowed) for n in ast.walk(tree)), expr
    value = eval(compile(tree, "<transcript>", "eval"), {"__builtins__": {}})
    assert isinstance(value, bytes), expr
    return value


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


class Transcript:
    """A runner's base: ``send`` and ``directive`` are the protocol's; ``pending`` holds
    the reply lines sent and not yet matched."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.pending: list[bytes] = []

    def fail(self, lineno: int, msg: str) -> NoReturn:
        pytest.fail(f"{self.name}:{lineno}: {msg}")

    async def send(self, lineno: int, data: bytes) -> None:
        raise NotImplementedError

    async def directive(self, lineno: int, text: str) -> None:
        raise NotImplementedError

    def expect(self, lineno: int, pattern: str, regex: bool) -> None:
        if not self.pending:
            self.fail(lineno, f"expected {pattern!r}, the server sent nothing more")
        got = self.pending.pop(0).decode("utf-8", "replace")
        if (regex and not re.fullmatch(pattern, got)) or (not regex and got != pattern):
            self.fail(lineno, f"expected {pattern!r}, got {got!r}")

    def expect_closed(self, lineno: int, closed: bool) -> None:
        """``@closed``: every reply read, and the server closed the connection."""
        if self.pending:
            self.fail(lineno, f"unread reply lines: {self.pending!r}")
        if not closed:
            self.fail(lineno, "connection still open")

    async def play(self, path: Path) -> None:
        for lineno, line in enumerate(_lines(path), 1):
            if not line.strip() or line.startswith("#"):
                continue
            if line.startswith("@"):
                await self.directive(lineno, line)
            elif line.startswith("C: ") or line == "C:":
                await self.send(lineno, line[3:].encode() + b"\r\n")
            elif line.startswith("C< "):
                await self.send(lineno, literal_bytes(line[3:]))
            elif line.startswith("S: "):
                self.expect(lineno, line[3:], regex=False)
            elif line.startswith("S~ "):
                self.expect(lineno, line[3:], regex=True)
            else:
                self.fail(lineno, f"cannot read {line!r}")
        if self.pending:
            self.fail(0, f"unread reply lines at end: {self.pending!r}")

"""Every SMTP reply lives in libs/protocols/smtp_replies.py (issue 11.1): each name says its
code, each text carries an enhanced status code of the same class (RFC 3463; RFC 2034 §4
exempts the greeting and HELO/EHLO), and no other module spells a reply of its own."""

from __future__ import annotations

import re
from pathlib import Path

from postbus.protocols import smtp_replies

ROOT = Path(__file__).resolve().parents[2]
NAMED = {n: v for n, v in vars(smtp_replies).items() if re.fullmatch(r"R\d{3}_[A-Z0-9_]+", n)}
NO_ENHANCED = {"R220_GREETING", "R250_HELO", "R354_START_DATA", "R334_CHALLENGE"}  # RFC 2034 §4


def test_there_is_a_table() -> None:
    assert len(NAMED) > 60
    assert all(isinstance(v, str) for v in NAMED.values())


def test_names_match_their_texts() -> None:
    for name, text in NAMED.items():
        code = name[1:4]
        assert text.startswith(code + " "), name
        if name in NO_ENHANCED:
            continue
        enhanced = text.split(" ", 2)[1]
        assert re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", enhanced), name
        assert enhanced[0] == code[0], f"{name}: {enhanced} is not of class {code[0]}"


def test_texts_are_distinct_and_one_line() -> None:
    assert len(set(NAMED.values())) == len(NAMED)
    assert not any("\r" in t or "\n" in t for t in NAMED.values())


def test_no_module_spells_a_reply_of_its_own() -> None:
    reply = re.compile(r"""f?["'][245]\d\d[ -][245]\.\d""")
    for path in [ROOT / "libs/protocols/smtp.py", *(ROOT / "services/smtp-ingress").glob("*.py")]:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            assert not reply.search(line), f"{path.name}:{i}: {line.strip()}"

"""Store error codes are a closed set (``postbus.proto.base.ErrorCode``, issue 11 item 2):
every code the store, the bus and the adapters can raise is in it, and an IMAP session
answers every code in it with its own response code (RFC 5530), end to end through the
session with a store that refuses."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
from test_imap_transcripts import Runner

from postbus.imap_access.ports import StoreError
from postbus.mailbox_store import directory_rules, mgmt, outcomes
from postbus.proto.base import ERROR_CODES, RpcError

ROOT = Path(__file__).resolve().parents[2]
# every module that turns a failure into a code on its way to a client
RAISERS = [
    "services/mailbox-store/storeapi.py",
    "services/mailbox-store/directory_rpc.py",
    "services/mailbox-store/mgmt.py",
    "services/imap-access/memory.py",
    "services/imap-access/adapters.py",
    "services/pop3-access/adapters.py",
    "libs/kit/bus.py",
]

# what the session says for each code: by default (STATUS), and where a command has its
# own answer (COPY and APPEND: TRYCREATE for a missing target, RFC 3501 §6.3.11)
STATUS_ANSWER = {
    "not_found": "NONEXISTENT",
    "exists": "ALREADYEXISTS",
    "invalid": "CANNOT",
    "over_quota": "OVERQUOTA",
    "conflict": "INUSE",
    "limit": "LIMIT",
    "unavailable": "UNAVAILABLE",
    "too_large": "SERVERBUG",
    "internal": "SERVERBUG",
}
TARGET_ANSWER = {"not_found": "TRYCREATE", "over_quota": "OVERQUOTA"}


def _subclasses(cls: type) -> list[type]:
    out = [cls]
    for sub in cls.__subclasses__():
        out += _subclasses(sub)
    return out


def test_every_store_error_class_has_a_code_of_the_set() -> None:
    codes = {c.code for c in _subclasses(outcomes.StoreError)}
    assert codes <= ERROR_CODES
    assert {"not_found", "exists", "invalid", "over_quota", "conflict", "limit"} <= codes
    directory = {c.code for c in _subclasses(directory_rules.DirectoryError)}
    assert directory <= ERROR_CODES and {"not_found", "exists", "conflict"} <= directory


def test_the_admin_api_answers_every_refusal_with_its_own_status() -> None:
    # internal and too_large are our bugs: 500, as for any other exception
    assert set(mgmt._STATUS) == ERROR_CODES - {"internal", "too_large"}


def _literal_codes(path: Path) -> list[tuple[int, str]]:
    """The string literals a module passes as an error code: the first argument or
    ``code=`` of StoreError / RemoteError / RpcError calls."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        name = getattr(node.func, "id", getattr(node.func, "attr", ""))
        if name not in ("StoreError", "RemoteError", "RpcError"):
            continue
        args = list(node.args[:1]) + [k.value for k in node.keywords if k.arg == "code"]
        out += [(node.lineno, a.value) for a in args
                if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return out


def test_every_code_raised_in_the_source_is_in_the_set() -> None:
    found = [(p, line, code) for p in RAISERS for line, code in _literal_codes(ROOT / p)]
    assert len(found) >= 15, found  # the scan sees the raises (memory.py alone has many)
    assert [f for f in found if f[2] not in ERROR_CODES] == []


def test_an_unknown_code_on_the_wire_reads_as_internal() -> None:
    assert RpcError.model_validate_json('{"code": "from_the_future"}').code == "internal"
    assert RpcError.model_validate_json('{"code": "limit"}').code == "limit"


def test_the_session_answers_every_code() -> None:
    assert set(STATUS_ANSWER) == ERROR_CODES


def _refusing(r: Runner, method: str, code: str) -> None:
    async def refuse(*_a: Any, **_k: Any) -> Any:
        raise StoreError(code, "refused by the test")  # type: ignore[arg-type]
    setattr(r.mp, method, refuse)


async def _answer(r: Runner, tag: str, lines: bytes) -> str:
    await r.send(lines)
    tagged = [x for x in r.out.take_lines() if x.startswith(tag + " ")]
    assert len(tagged) == 1, tagged
    return tagged[0]


@pytest.mark.parametrize("code", sorted(ERROR_CODES))
async def test_status_answers_each_code(code: str) -> None:
    r = Runner(secure=True)
    await _answer(r, "a1", b"a1 LOGIN alice@example.test secret\r\n")
    _refusing(r, "mailbox_status", code)
    line = await _answer(r, "a2", b"a2 STATUS INBOX (MESSAGES)\r\n")
    assert line.startswith(f"a2 NO [{STATUS_ANSWER[code]}]"), line


@pytest.mark.parametrize("code", sorted(ERROR_CODES))
async def test_copy_and_append_answer_each_code(code: str) -> None:
    r = Runner(secure=True)
    await _answer(r, "a1", b"a1 LOGIN alice@example.test secret\r\n")
    await _answer(r, "a2", b"a2 SELECT INBOX\r\n")
    want = TARGET_ANSWER.get(code, STATUS_ANSWER[code])
    _refusing(r, "copy", code)
    line = await _answer(r, "a3", b"a3 COPY 1 Trash\r\n")
    assert line.startswith(f"a3 NO [{want}]"), line
    _refusing(r, "append", code)
    line = await _answer(r, "a4", b"a4 APPEND Trash {3+}\r\nabc\r\n")
    assert line.startswith(f"a4 NO [{want}]"), line

"""mailbox-store management API through the real app (kit.mgmt.create_app + mgmt.router),
real SQL, real S3 (SeaweedFS) and a real nats-server."""

from __future__ import annotations

import asyncio
import io
import mailbox
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from store_dir_support import BACKENDS, open_db

from postbus.kit.blob import BlobStore
from postbus.kit.bus import Bus
from postbus.kit.mgmt import create_app
from postbus.kit.testing import ADMIN_TOKEN
from postbus.mailbox_store.directory import Directory, serve_directory
from postbus.mailbox_store.importexport import read_mbox
from postbus.mailbox_store.mgmt import router
from postbus.mailbox_store.passwords import Passwords, fast_hasher
from postbus.mailbox_store.repository import Repository
from postbus.proto.directory import DIRECTORY_RESOLVE, ResolveRequest
from postbus.proto.mail import MAILBOX_CHANGED, MailboxChanged

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


class Api:
    def __init__(self, client: httpx.AsyncClient, directory: Directory, bus: Bus) -> None:
        self.c = client
        self.dir = directory
        self.bus = bus

    async def ok(self, method: str, url: str, want: int = 200, **kw: Any) -> Any:
        r = await self.c.request(method, url, headers=AUTH, **kw)
        assert r.status_code == want, (r.status_code, r.text)
        if r.headers.get("content-type", "").startswith("application/json"):
            return r.json()
        return r


@pytest_asyncio.fixture(params=BACKENDS)
async def api(request: pytest.FixtureRequest, tmp_path: Path, bus: Bus,
              blobs: BlobStore) -> AsyncIterator[Api]:
    async for sm in open_db(request.param, tmp_path):
        repo = Repository(sm.kw["bind"])
        d = await serve_directory(bus, sm, passwords=Passwords(fast_hasher()), repo=repo)
        app = create_app("mailbox-store", checks={}, token_source=lambda: ADMIN_TOKEN,
                         routers=[router(sm, blobs, bus, repo, directory=d)])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://store") as c:
            yield Api(c, d, bus)


async def test_needs_token(api: Api) -> None:
    r = await api.c.get("/api/v1/domains")
    assert r.status_code == 401
    r = await api.c.get("/api/v1/domains", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = await api.c.post("/api/v1/users", json={"address": "a@b.test", "password": "x"})
    assert r.status_code == 401
    assert (await api.c.get("/openapi.json")).json()["paths"]["/api/v1/users"]


async def test_domains_users_status_codes(api: Api) -> None:
    dom = await api.ok("POST", "/api/v1/domains", 201, json={"name": "Example.TEST"})
    assert dom["name"] == "example.test"
    await api.ok("POST", "/api/v1/domains", 409, json={"name": "example.test"})
    await api.ok("POST", "/api/v1/domains", 422, json={"name": "not a domain"})
    await api.ok("POST", "/api/v1/domains", 422, json={})
    assert [x["name"] for x in await api.ok("GET", "/api/v1/domains")] == ["example.test"]

    r = await api.ok("POST", "/api/v1/users", 422,
                     json={"address": "bob@nowhere.test", "password": "pw"})
    assert "nowhere.test does not exist" in r["detail"]
    u = await api.ok("POST", "/api/v1/users", 201,
                     json={"address": "Alice@example.test", "password": "pw", "quota_bytes": 10_000})
    assert u["address"] == "alice@example.test"
    assert u["usage"] == {"used_bytes": 0, "messages": 0, "quota_bytes": 10_000, "percent": 0.0}
    await api.ok("POST", "/api/v1/users", 409, json={"address": "alice@EXAMPLE.test",
                                                     "password": "pw"})
    await api.ok("POST", "/api/v1/users", 422, json={"address": "alice@example.test"})
    await api.ok("POST", "/api/v1/users", 422, json={"address": "a b@example.test",
                                                     "password": "pw"})
    await api.ok("POST", "/api/v1/users", 422, json={"address": "c@example.test",
                                                     "password": "pw", "pop3_policy": "x"})
    await api.ok("GET", "/api/v1/users/nobody@example.test", 404)
    boxes = await api.ok("GET", "/api/v1/users/alice@example.test/mailboxes")
    assert {b["name"]: b["special_use"] for b in boxes} == {
        "INBOX": None, "Drafts": "\\Drafts", "Sent": "\\Sent", "Trash": "\\Trash",
        "Junk": "\\Junk", "Archive": "\\Archive"}
    assert [x["address"] for x in await api.ok("GET", "/api/v1/users?domain=example.test")] == [
        "alice@example.test"]
    # a domain with users is not deleted without force
    await api.ok("DELETE", "/api/v1/domains/example.test", 409)
    await api.ok("DELETE", "/api/v1/users/alice@example.test", 204)
    await api.ok("DELETE", "/api/v1/users/alice@example.test", 404)
    await api.ok("DELETE", "/api/v1/domains/example.test", 204)
    await api.ok("DELETE", "/api/v1/domains/example.test", 404)


async def test_password_disable_and_pop3_policy(api: Api) -> None:
    await api.ok("POST", "/api/v1/domains", 201, json={"name": "example.test"})
    await api.ok("POST", "/api/v1/users", 201, json={"address": "alice@example.test",
                                                     "password": "old"})
    u = await api.ok("PATCH", "/api/v1/users/alice@example.test",
                     json={"password": "new", "pop3_policy": "delete", "pop3_expire_days": 7,
                           "quota_bytes": 500})
    assert (u["pop3_policy"], u["pop3_expire_days"], u["quota_bytes"]) == ("delete", 7, 500)
    assert not (await api.dir.authenticate("alice@example.test", "old")).ok
    r = await api.dir.authenticate("alice@example.test", "new")
    assert r.ok and r.pop3_policy == "delete" and r.pop3_expire_days == 7
    u = await api.ok("PATCH", "/api/v1/users/alice@example.test",
                     json={"quota_bytes": None, "enabled": False})
    assert u["quota_bytes"] is None and not u["enabled"]
    r = await api.dir.authenticate("alice@example.test", "new")
    assert not r.ok and r.reason == "disabled"
    rep = await api.bus.request(DIRECTORY_RESOLVE, ResolveRequest(address="alice@example.test"))
    assert rep.status == "disabled"
    await api.ok("PATCH", "/api/v1/users/alice@example.test", 422, json={"pop3_policy": "never"})
    await api.ok("PATCH", "/api/v1/users/alice@example.test", 422, json={"password": ""})
    await api.ok("PATCH", "/api/v1/users/ghost@example.test", 404, json={"enabled": True})


async def test_aliases_catch_all_subaddress(api: Api) -> None:
    await api.ok("POST", "/api/v1/domains", 201, json={"name": "example.test"})
    for who in ("alice", "bob"):
        await api.ok("POST", "/api/v1/users", 201, json={"address": f"{who}@example.test",
                                                         "password": "pw"})
    al = await api.ok("POST", "/api/v1/aliases", 201,
                      json={"address": "team@example.test",
                            "targets": ["alice@example.test", "bob@example.test"]})
    assert al["targets"] == ["alice@example.test", "bob@example.test"]
    await api.ok("POST", "/api/v1/aliases", 409, json={"address": "team@example.test",
                                                       "targets": ["alice@example.test"]})
    await api.ok("POST", "/api/v1/aliases", 422, json={"address": "x@example.test",
                                                       "targets": ["ghost@example.test"]})
    await api.ok("POST", "/api/v1/aliases", 422, json={"address": "x@example.test",
                                                       "targets": []})
    await api.ok("POST", "/api/v1/aliases", 422, json={"address": "x@other.test",
                                                       "targets": ["bob@example.test"]})

    async def resolve(addr: str) -> tuple[str, list[str]]:
        r = await api.bus.request(DIRECTORY_RESOLVE, ResolveRequest(address=addr))
        return r.status, sorted(a.address for a in r.accounts)

    assert await resolve("team+x@example.test") == ("local", ["alice@example.test",
                                                              "bob@example.test"])
    assert await resolve("alice+news@Example.test") == ("local", ["alice@example.test"])
    assert await resolve("random@example.test") == ("unknown", [])
    dom = await api.ok("PATCH", "/api/v1/domains/example.test",
                       json={"catch_all": "bob@example.test"})
    assert dom["catch_all"] == "bob@example.test"
    assert await resolve("random@example.test") == ("local", ["bob@example.test"])
    await api.ok("PATCH", "/api/v1/domains/example.test", 422, json={"catch_all": "x@y.test"})
    dom = await api.ok("PATCH", "/api/v1/domains/example.test", json={"catch_all": None})
    assert dom["catch_all"] is None
    assert await resolve("random@example.test") == ("unknown", [])
    al = await api.ok("PATCH", "/api/v1/aliases/team@example.test",
                      json={"targets": ["bob@example.test"]})
    assert al["targets"] == ["bob@example.test"]
    assert [a["address"] for a in await api.ok("GET", "/api/v1/aliases")] == ["team@example.test"]
    await api.ok("DELETE", "/api/v1/aliases/team@example.test", 204)
    assert await resolve("team@example.test") == ("unknown", [])
    await api.ok("PATCH", "/api/v1/domains/example.test",
                 json={"local_part_case_sensitive": True})
    assert await resolve("ALICE@example.test") == ("unknown", [])
    metrics = (await api.c.get("/metrics")).text
    assert 'postbus_directory_resolve_total{status="local"}' in metrics
    assert 'postbus_directory_resolve_total{status="unknown"}' in metrics


def _mbox_bytes(tmp: Path, n: int) -> bytes:
    p = tmp / "src.mbox"
    box = mailbox.mbox(str(p))
    for i in range(n):
        m = mailbox.mboxMessage(
            f"From: Sender {i} <s{i}@example.net>\nTo: alice@example.test\n"
            f"Subject: imported {i}\nMessage-ID: <m{i}@example.net>\n\n"
            f"body {i}\nFrom the archive\n")
        m.set_from(f"s{i}@example.net", (2024, 1 + i // 28, 1 + i % 28, 12, 0, 0, 0, 0, 0))
        if i % 2:
            m.set_flags("RF")
        box.add(m)
    box.flush()
    box.close()
    return p.read_bytes()


async def alice_with_changes(api: Api) -> list[MailboxChanged]:
    """Domain and user alice; the MAILBOX_CHANGED events of her account, as they arrive."""
    await api.ok("POST", "/api/v1/domains", 201, json={"name": "example.test"})
    u = await api.ok("POST", "/api/v1/users", 201, json={"address": "alice@example.test",
                                                         "password": "pw"})
    changes: list[MailboxChanged] = []

    async def seen(ev: MailboxChanged) -> None:
        changes.append(ev)

    await api.bus.subscribe_core(MAILBOX_CHANGED, seen, account_id=str(u["id"]))
    return changes


async def test_mgmt_changes_go_out_in_parts(api: Api, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """An import's change notifications are split as every store writer's are (issue 11.5:
    one change publisher), so a large one never meets the NATS payload limit."""
    from postbus.mailbox_store import delivery

    monkeypatch.setattr(delivery, "CHANGE_CHUNK", 7)
    changes = await alice_with_changes(api)
    rep = await api.ok("POST", "/api/v1/users/alice@example.test/import?format=mbox",
                       content=_mbox_bytes(tmp_path, 40))
    assert rep["imported"] == 40
    for _ in range(500):  # the change events arrive on their own (poll, do not sleep)
        if sum(len(c.added) for c in changes) >= 40:
            break
        await asyncio.sleep(0.02)
    assert sorted(m.uid for c in changes for m in c.added) == list(range(1, 41))
    assert all(len(c.added) <= 7 and c.origin == "mgmt" for c in changes)


async def test_import_list_export_round_trip(api: Api, tmp_path: Path) -> None:
    changes = await alice_with_changes(api)

    data = _mbox_bytes(tmp_path, 40)
    rep = await api.ok("POST", "/api/v1/users/alice@example.test/import?format=mbox", content=data)
    assert rep["imported"] == 40 and rep["failed"] == 0 and rep["first_uid"] == 1
    assert rep["last_uid"] == 40 and rep["mailbox"] == "INBOX"

    page = await api.ok("GET", "/api/v1/users/alice@example.test/mailboxes/INBOX/messages?limit=25")
    assert [m["uid"] for m in page["messages"]] == list(range(1, 26))
    assert page["next_after_uid"] == 25
    first = page["messages"][0]
    assert first["subject"] == "imported 0" and "s0@example.net" in first["from"]
    assert first["internaldate"].startswith("2024-01-01T12:00:00")
    assert page["messages"][1]["flags"] == ["\\Seen", "\\Flagged"]
    page2 = await api.ok("GET", "/api/v1/users/alice@example.test/mailboxes/inbox/messages"
                                "?after_uid=25&limit=25")
    assert [m["uid"] for m in page2["messages"]] == list(range(26, 41))
    assert page2["next_after_uid"] is None

    raw = (await api.ok("GET", "/api/v1/users/alice@example.test/mailboxes/INBOX/messages/3/raw")
           ).content
    assert raw.startswith(b"From: Sender 2 <s2@example.net>\r\n")
    assert raw.endswith(b"body 2\r\nFrom the archive\r\n")
    meta = await api.ok("GET", "/api/v1/users/alice@example.test/mailboxes/INBOX/messages/3")
    assert meta["size"] == len(raw) and meta["message_id"] == "<m2@example.net>"

    usage = (await api.ok("GET", "/api/v1/users/alice@example.test"))["usage"]
    assert usage["messages"] == 40 and usage["used_bytes"] > 40 * 100
    boxes = {b["name"]: b for b in await api.ok("GET", "/api/v1/users/alice@example.test/mailboxes")}
    assert boxes["INBOX"]["messages"] == 40 and boxes["INBOX"]["unseen"] == 20

    await api.ok("DELETE", "/api/v1/users/alice@example.test/mailboxes/INBOX/messages/3", 204)
    await api.ok("GET", "/api/v1/users/alice@example.test/mailboxes/INBOX/messages/3", 404)
    await api.ok("GET", "/api/v1/users/alice@example.test/mailboxes/Nope/messages", 404)

    r = await api.ok("GET", "/api/v1/users/alice@example.test/export?mailbox=INBOX")
    assert r.headers["content-type"] == "application/mbox"
    back = list(read_mbox(io.BytesIO(r.content)))
    assert len(back) == 39
    assert b"Subject: imported 0\r\n" in back[0].raw
    assert back[0].raw.endswith(b"body 0\r\nFrom the archive\r\n")
    assert back[1].flags == ["\\Seen", "\\Flagged"] and back[0].flags == []
    # the export imports again, into a new folder, with the same flags
    rep = await api.ok("POST", "/api/v1/users/alice@example.test/import?format=mbox"
                              "&mailbox=Archive/2024", content=r.content)
    assert rep["imported"] == 39 and rep["mailbox"] == "Archive/2024"
    page = await api.ok("GET", "/api/v1/users/alice@example.test/mailboxes/Archive/2024/messages"
                               "?limit=2")
    assert page["messages"][1]["flags"] == ["\\Seen", "\\Flagged"]
    for _ in range(200):  # the change events arrive on their own (poll, do not sleep)
        if (any(c.mailbox == "INBOX" and c.added for c in changes)
                and any(c.expunged == [3] for c in changes)):
            break
        await asyncio.sleep(0.02)
    assert any(c.mailbox == "INBOX" and c.added for c in changes)
    assert any(c.expunged == [3] for c in changes)


async def test_import_maildir_eml_and_bad_input(api: Api, tmp_path: Path) -> None:
    await api.ok("POST", "/api/v1/domains", 201, json={"name": "example.test"})
    await api.ok("POST", "/api/v1/users", 201, json={"address": "alice@example.test",
                                                     "password": "pw", "quota_bytes": 5000})
    md = mailbox.Maildir(str(tmp_path / "Maildir"))
    for i, (sub, fl) in enumerate([("new", ""), ("cur", "S"), ("cur", "RS")]):
        m = mailbox.MaildirMessage(f"Subject: md {i}\n\nmaildir {i}\n")
        m.set_subdir(sub)
        m.set_flags(fl)
        md.add(m)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        t.add(tmp_path / "Maildir", arcname="Maildir")
    rep = await api.ok("POST", "/api/v1/users/alice@example.test/import?format=maildir&mailbox=Old",
                       content=buf.getvalue())
    assert rep["imported"] == 3
    msgs = (await api.ok("GET", "/api/v1/users/alice@example.test/mailboxes/Old/messages"))["messages"]
    assert sorted(tuple(sorted(m["flags"])) for m in msgs) == [(), ("\\Answered", "\\Seen"), ("\\Seen",)]

    # Maildir++ folders land in mailboxes of their name (below the target unless INBOX)
    md.add_folder("Sent").add(mailbox.MaildirMessage("Subject: sent\n\nout\n"))
    md.add_folder("Work.Projects").add(mailbox.MaildirMessage("Subject: w\n\nwork\n"))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        t.add(tmp_path / "Maildir", arcname="Maildir")
    rep = await api.ok("POST", "/api/v1/users/alice@example.test/import?format=maildir",
                       content=buf.getvalue())
    assert rep["mailboxes"] == {"INBOX": 3, "Sent": 1, "Work/Projects": 1}
    rep = await api.ok("POST", "/api/v1/users/alice@example.test/import?format=maildir"
                              "&mailbox=Restored", content=buf.getvalue())
    assert rep["mailboxes"] == {"Restored": 3, "Restored/Sent": 1, "Restored/Work/Projects": 1}
    boxes = {b["name"]: b["messages"]
             for b in await api.ok("GET", "/api/v1/users/alice@example.test/mailboxes")}
    assert boxes["Sent"] == 1 and boxes["Work/Projects"] == 1 and boxes["Restored/Sent"] == 1

    rep = await api.ok("POST", "/api/v1/users/alice@example.test/import?format=eml",
                       content=b"Subject: single\r\nFrom: x@y.test\r\n\r\nhi\r\n")
    assert rep["imported"] == 1
    await api.ok("POST", "/api/v1/users/alice@example.test/import?format=mbox", 422,
                 content=b"Subject: not an mbox\n\nbody\n")
    await api.ok("POST", "/api/v1/users/alice@example.test/import?format=maildir&mailbox=Fail",
                 422, content=b"not a tar")
    await api.ok("GET", "/api/v1/users/alice@example.test/mailboxes/Fail/messages", 404)
    await api.ok("POST", "/api/v1/users/alice@example.test/import?format=eml&mailbox=a%2A",
                 422, content=b"Subject: x\r\n\r\nx\r\n")
    await api.ok("POST", "/api/v1/users/alice@example.test/import?format=pst", 422, content=b"x")
    await api.ok("POST", "/api/v1/users/alice@example.test/import", 422, content=b"")
    await api.ok("POST", "/api/v1/users/ghost@example.test/import", 404, content=b"x")
    # over quota: the import stops and says why
    rep = await api.ok("POST", "/api/v1/users/alice@example.test/import?format=mbox",
                       content=_mbox_bytes(tmp_path, 60))
    assert 0 < rep["imported"] < 60 and rep["stopped"] and "quota" in rep["stopped"]
    usage = (await api.ok("GET", "/api/v1/users/alice@example.test"))["usage"]
    assert usage["used_bytes"] <= 5000


async def test_delete_user_with_mail_releases_blobs(api: Api, tmp_path: Path) -> None:
    await api.ok("POST", "/api/v1/domains", 201, json={"name": "example.test"})
    for who in ("alice", "bob"):
        await api.ok("POST", "/api/v1/users", 201, json={"address": f"{who}@example.test",
                                                         "password": "pw"})
    data = _mbox_bytes(tmp_path, 3)
    for who in ("alice", "bob"):
        await api.ok("POST", f"/api/v1/users/{who}@example.test/import", content=data)
    await api.ok("DELETE", "/api/v1/users/alice@example.test", 204)
    # bob's copies (the same blobs) are still readable
    raw = (await api.ok("GET", "/api/v1/users/bob@example.test/mailboxes/INBOX/messages/1/raw")
           ).content
    assert b"Subject: imported 0" in raw
    freed = await api.dir.delete_account("bob@example.test")
    assert len(freed) == 3  # now nothing references them: blob GC collects after the grace


def test_export_reads_blobs_in_bounded_groups() -> None:
    from datetime import UTC, datetime

    from postbus.mailbox_store.mailadmin import _by_bytes
    from postbus.proto.store import MessageMeta

    metas = [MessageMeta(uid=i, flags=[], modseq=1, internaldate=datetime.now(UTC), size=s,
                         blob_key=f"blobs/{i}", blob_size=s) for i, s in enumerate([5, 5, 20, 1, 1])]
    assert [[m.uid for m in g] for g in _by_bytes(metas, 10)] == [[0, 1], [2], [3, 4]]
    assert list(_by_bytes([], 10)) == []

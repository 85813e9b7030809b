"""Dovecot's imaptest compliance scripts against Postbus (what `make imaptest` runs): the
platform as `make run` starts it, two users, every script of ../shared/tools/imaptest/tests
(or IMAPTEST_DIR). Prints imaptest's own report (one line per failing script, then the
totals) and writes bench-results/imaptest.json. Skips with a message where the tool is
missing. Dovecot 2.3.19 on this kind of machine: 72 groups, 0 failed, 4 skipped.

    python tests/bench/imaptest_compliance.py [script ...]
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
TOOL = Path(os.environ.get("IMAPTEST_DIR", ROOT.parent / "shared" / "tools" / "imaptest"))
USERS = ("a@example.test", "b@example.test")
PASSWORD = "pass"


def summary(out: str) -> dict[str, object]:
    m = re.search(r"(\d+) test groups: (\d+) failed, (\d+) skipped", out)
    base = re.search(r"[Bb]ase protocol: (\d+)/(\d+)", out)
    ext = re.search(r"[Ee]xtensions: (\d+)/(\d+)", out)
    return {
        "groups": int(m.group(1)) if m else None,
        "failed": int(m.group(2)) if m else None,
        "skipped": int(m.group(3)) if m else None,
        "base_failed": f"{base.group(1)}/{base.group(2)}" if base else None,
        "extensions_failed": f"{ext.group(1)}/{ext.group(2)}" if ext else None,
    }


def main() -> int:
    binary = TOOL / "bin" / "imaptest"
    if not binary.exists():
        print(f"SKIP imaptest: no imaptest at {TOOL} (set IMAPTEST_DIR)")
        return 0
    from postbus.kit.testing import RunningNats, RunningS3, start_platform

    root = Path(tempfile.mkdtemp(prefix="imaptest-"))
    nats, s3 = RunningNats(root), RunningS3(root)
    plat = start_platform(root / "platform", nats, s3.endpoint,
                          extra_env={"POSTBUS_LOG_LEVEL": "WARNING",
                                     "POSTBUS_IMAP_ACCESS_AUTH_FAIL_DELAY_S": "0"})
    try:
        auth = {"Authorization": f"Bearer {plat.token}"}
        with httpx.Client(base_url=plat.api("mailbox-store") + "/api/v1", headers=auth,
                          timeout=60) as http:
            http.post("/domains", json={"name": "example.test"}).raise_for_status()
            for u in USERS:
                http.post("/users", json={"address": u, "password": PASSWORD}).raise_for_status()
        tests = TOOL / "tests"
        if len(sys.argv) > 1:  # only some scripts: copy them (with their mboxes) aside
            pick = root / "tests"
            pick.mkdir()
            for name in sys.argv[1:]:
                for f in tests.glob(name + "*"):
                    shutil.copy(f, pick / f.name)
            tests = pick
        port = plat.port("imap-access", "imap_port")
        cmd = ["timeout", "900", str(binary), "host=127.0.0.1", f"port={port}",
               f"user={USERS[0]}", f"user2={USERS[1]}", f"pass={PASSWORD}", f"test={tests}"]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
        text = out.stdout + out.stderr
        print(text)
        result = {"summary": summary(text), "output": text[-20000:]}
        (ROOT / "bench-results").mkdir(exist_ok=True)
        (ROOT / "bench-results" / "imaptest.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result["summary"]))
        return 0
    finally:
        plat.stop()
        nats.stop()
        s3.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("POSTBUS_LOG_LEVEL", "WARNING")
    raise SystemExit(main())

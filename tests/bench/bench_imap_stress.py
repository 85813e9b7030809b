"""IMAP under load, side by side with Dovecot: Dovecot's imaptest (default command mix and
login-only, 20 clients over 50 users, 30 s) against Postbus and a tuned Dovecot on the same
machine in the same run, interleaved; medians of three runs and the ratio. Also the CPU each
Postbus process used per command, imaptest's own ``Error:`` lines (consistency bugs that only
show under concurrency) and the RSS of every service. During the mix a probe client of its
own (imaplib, one more account) times SELECT, APPEND, STORE and EXPUNGE on both servers:
imaptest prints only averages, the target is on medians (p50, p90 reported).

    python tests/bench/bench_imap_stress.py [--secs 30] [--runs 3] [--clients 20]
    python tests/bench/bench_imap_stress.py --keep    # leave the platform up, print its ports

Needs ../shared/tools/imaptest (or IMAPTEST_DIR) and Debian's dovecot-imapd (installed with
apt-get when missing and root); skips with a message when either cannot be had.
Writes bench-results/imap-stress.json.
"""

from __future__ import annotations

import argparse
import imaplib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from proc_support import cpu_seconds, rss_mb

ROOT = Path(__file__).resolve().parents[2]
TOOL = Path(os.environ.get("IMAPTEST_DIR", ROOT.parent / "shared" / "tools" / "imaptest"))
USERS, PASSWORD = 50, "pass"


def imaptest(port: int, user: str, secs: int, clients: int, login_only: bool) -> dict[str, object]:
    cmd = [str(TOOL / "bin" / "imaptest"), "host=127.0.0.1", f"port={port}", f"user={user}",
           f"users={USERS}", f"pass={PASSWORD}", f"clients={clients}", f"secs={secs}",
           "seed=123", f"mbox={TOOL / 'stress.mbox'}"] + (["-", "select=0"] if login_only else [])
    out = subprocess.run(["timeout", str(secs + 90), *cmd], capture_output=True,
                         text=True).stdout
    tail = out.split("Totals:", 1)[-1].splitlines()
    names = next((line.split() for line in tail if line.startswith("Logi")), [])
    nums = [line.split() for line in tail if re.fullmatch(r"[\d ]+", line.strip() or "x")]
    counts = dict(zip(names, map(int, nums[-1]), strict=False)) if names and nums else {}
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    latency = {}
    for line in out.splitlines():  # imaptest prints "- <cmd> ... avg <ms>" only per state
        m = re.match(r"^\s*(\w+)\s.*?(\d+) ms", line)
        if m and m.group(1).upper() in ("APPEND", "STORE", "EXPUNGE", "SELECT", "LOGIN"):
            latency[m.group(1).upper()] = int(m.group(2))
    total = sum(counts.values())
    return {"cmds_per_s": total / secs, "logins_per_s": counts.get("Logi", 0) / secs,
            "commands": total, "errors": len(errors), "error_lines": errors[:20],
            "counts": counts, "raw_tail": "\n".join(tail[-8:])}


PROBED = ("SELECT", "APPEND", "STORE", "EXPUNGE")


class Probe(threading.Thread):
    """One more client beside imaptest's: SELECT INBOX, APPEND a small message, STORE
    \\Deleted on it, EXPUNGE, every 100 ms, each command timed on the wire."""

    def __init__(self, port: int, user: str) -> None:
        super().__init__(daemon=True)
        self.port, self.user = port, user
        self.times: dict[str, list[float]] = {c: [] for c in PROBED}
        self.stop = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        msg = b"From: probe@example.net\r\nSubject: probe\r\n\r\nprobe\r\n"
        try:
            c = imaplib.IMAP4("127.0.0.1", self.port)
            c.login(self.user, PASSWORD)
            while not self.stop.is_set():
                for name, call in (
                        ("SELECT", lambda: c.select("INBOX")),
                        ("APPEND", lambda: c.append("INBOX", None, None, msg)),
                        ("STORE", lambda: c.store("1:*", "+FLAGS.SILENT", "(\\Deleted)")),
                        ("EXPUNGE", lambda: c.expunge())):
                    t = time.perf_counter()
                    typ, _ = call()
                    if typ != "OK":
                        raise RuntimeError(f"{name} answered {typ}")
                    self.times[name].append((time.perf_counter() - t) * 1000)
                self.stop.wait(0.1)
            c.logout()
        except Exception as exc:  # reported, not hidden: the figures would be partial
            self.error = f"{type(exc).__name__}: {exc}"

    def percentiles(self) -> dict[str, dict[str, float]]:
        out = {}
        for name, v in self.times.items():
            if v:
                v = sorted(v)
                out[name] = {"p50": round(v[len(v) // 2], 1),
                             "p90": round(v[min(len(v) - 1, int(len(v) * 0.9))], 1),
                             "n": len(v)}
        return out


def probed(port: int, imaptest_user: str, probe_user: str, secs: int, clients: int,
           login_only: bool) -> tuple[dict[str, object], Probe | None]:
    """One imaptest run; during the mix, with the probe beside it."""
    if login_only:
        return imaptest(port, imaptest_user, secs, clients, True), None
    probe = Probe(port, probe_user)
    probe.start()
    try:
        return imaptest(port, imaptest_user, secs, clients, False), probe
    finally:
        probe.stop.set()
        probe.join(30)


def provision(api: str, token: str) -> None:
    auth = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=api + "/api/v1", headers=auth, timeout=60) as http:
        http.post("/domains", json={"name": "example.test"}).raise_for_status()
        for i in range(1, USERS + 1):
            http.post("/users", json={"address": f"user{i}@example.test",
                                      "password": PASSWORD}).raise_for_status()
        http.post("/users", json={"address": "probe@example.test",
                                  "password": PASSWORD}).raise_for_status()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--secs", type=int, default=30)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--keep", action="store_true", help="start, provision, print ports, wait")
    ap.add_argument("--no-dovecot", action="store_true", help="Postbus only")
    ap.add_argument("--out", default=str(ROOT / "bench-results" / "imap-stress.json"))
    args = ap.parse_args()

    if not (TOOL / "bin" / "imaptest").exists() and not args.keep:
        print(f"SKIP bench-imap-stress: no imaptest at {TOOL} (set IMAPTEST_DIR)")
        return 0
    anchor_dir = Path(tempfile.mkdtemp(prefix="dovecot-anchor-"))
    dovecot_port = None
    if not args.keep and not args.no_dovecot:
        from postbus.kit.embedded import free_port

        dovecot_port = free_port()
        # a file, not a pipe: dovecot's daemon keeps the descriptors it was given open
        log = anchor_dir / "anchor.log"
        with log.open("w") as out:
            r = subprocess.run([str(TOOL / "dovecot-anchor"), "start", str(anchor_dir),
                                str(dovecot_port), "plain"], stdout=out, stderr=out)
        if r.returncode != 0:
            print(f"SKIP bench-imap-stress: Dovecot anchor did not start: "
                  f"{log.read_text()[-500:]}")
            return 0

    from postbus.kit.testing import RunningNats, RunningS3, start_platform

    root = Path(tempfile.mkdtemp(prefix="bench-imap-stress-"))
    nats, s3 = RunningNats(root), RunningS3(root)
    plat = start_platform(root / "platform", nats, s3.endpoint,
                          extra_env={"POSTBUS_LOG_LEVEL": "WARNING"})
    try:
        provision(plat.api("mailbox-store"), plat.token)
        port = plat.port("imap-access", "imap_port")
        if args.keep:
            print(json.dumps({"imap": port, "pids": {n: p.pid for n, p in plat.procs.items()},
                              "root": str(root), "users": "user%d@example.test / pass"}),
                  flush=True)
            while True:
                time.sleep(3600)
        pids = {n: p.pid for n, p in plat.procs.items()}
        pids.update({"nats-server": nats.proc.pid, "seaweedfs": s3.proc.pid})
        result: dict[str, object] = {"secs": args.secs, "runs": args.runs,
                                     "clients": args.clients, "users": USERS}
        for mode in ("mix", "login-only"):
            rows: dict[str, list[dict[str, object]]] = {"postbus": [], "dovecot": []}
            cpu: dict[str, list[float]] = {n: [] for n in pids}
            peak_rss: dict[str, float] = dict.fromkeys(pids, 0.0)
            probes: dict[str, list[Probe]] = {"postbus": [], "dovecot": []}
            mix = mode == "mix"
            for _ in range(args.runs):
                before = {n: cpu_seconds(p) for n, p in pids.items()}
                r, probe = probed(port, "user%d@example.test", "probe@example.test",
                                  args.secs, args.clients, not mix)
                if probe is not None:
                    probes["postbus"].append(probe)
                for n, p in pids.items():
                    cpu[n].append((cpu_seconds(p) - before[n]) / max(1, int(r["commands"])))  # type: ignore[arg-type]
                    peak_rss[n] = max(peak_rss[n], rss_mb(p))
                rows["postbus"].append(r)
                time.sleep(2)
                if dovecot_port is not None:
                    d, probe = probed(dovecot_port, "user%d", "testuser", args.secs,
                                      args.clients, not mix)
                    rows["dovecot"].append(d)
                    if probe is not None:
                        probes["dovecot"].append(probe)
                    time.sleep(2)
            key = "logins_per_s" if mode == "login-only" else "cmds_per_s"
            pb = statistics.median(float(r[key]) for r in rows["postbus"])  # type: ignore[arg-type]
            dv = (statistics.median(float(r[key]) for r in rows["dovecot"])  # type: ignore[arg-type]
                  if rows["dovecot"] else 0.0)
            out = {
                "postbus_per_s": round(pb, 1), "dovecot_per_s": round(dv, 1),
                "ratio": round(pb / dv, 3) if dv else None,
                "postbus_errors": [r["errors"] for r in rows["postbus"]],
                "dovecot_errors": [r["errors"] for r in rows["dovecot"]],
                "postbus_error_lines": [x for r in rows["postbus"] for x in r["error_lines"]][:20],  # type: ignore[attr-defined]
                "cpu_ms_per_command": {n: round(statistics.median(v) * 1000, 3)
                                       for n, v in cpu.items()},
                "peak_rss_mb": {n: round(v, 1) for n, v in peak_rss.items()},
                "postbus_samples": [r["counts"] for r in rows["postbus"]],
                "postbus_tail": rows["postbus"][-1]["raw_tail"],
            }
            if mix:  # per-command latency of the probe, median over the runs' p50/p90
                out["probe_latency_ms"] = {
                    server: {c: {q: statistics.median(p.percentiles()[c][q] for p in ps)
                                 for q in ("p50", "p90")}
                             for c in PROBED if ps and all(c in p.percentiles() for p in ps)}
                    for server, ps in probes.items()}
                out["probe_errors"] = [p.error for ps in probes.values() for p in ps if p.error]
            result[mode] = out
            print(f"{mode}: postbus {pb:.0f}/s, dovecot {dv:.0f}/s, ratio "
                  f"{out['ratio']}, postbus Error: lines {out['postbus_errors']}", flush=True)
            print(f"  cpu ms/command {out['cpu_ms_per_command']}", flush=True)
            print(f"  peak RSS MB {out['peak_rss_mb']}", flush=True)
            if mix:
                print(f"  probe latency ms {out['probe_latency_ms']} "
                      f"errors {out['probe_errors']}", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
        return 0
    finally:
        plat.stop()
        nats.stop()
        s3.stop()
        if dovecot_port is not None:
            subprocess.run([str(TOOL / "dovecot-anchor"), "stop", str(anchor_dir)])
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("POSTBUS_LOG_LEVEL", "WARNING")
    sys.exit(main())

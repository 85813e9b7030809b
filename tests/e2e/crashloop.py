"""Crash loop: mail keeps arriving over SMTP while services of the real platform are killed
with SIGKILL and started again. Afterwards every message answered 250 must be in the
mailbox, and no SMTP attempt may have been stored twice (redeliveries inside the platform
are deduplicated). Used by tests/e2e/test_e2e_crash.py and tests/soak/soak_crash.py.

A client that got no 250 tries again, as a real MTA would; such a message may legitimately
be stored once per attempt (the first attempt can be queued with its 250 lost), so the
check is: copies <= attempts, and copies >= 1 when some attempt got 250.
"""

from __future__ import annotations

import imaplib
import random
import re
import smtplib
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx

from postbus.kit.testing import Platform
from postbus.kit.topology import BY_NAME

USER, PASSWORD = "crash@example.test", "crash-secret"
# consumers hand work of a killed process to its successor after this long (default 60 s)
FAST_REDELIVERY = {"POSTBUS_MIME_PROCESSOR_ACK_WAIT_S": "3",
                   "POSTBUS_MAILBOX_STORE_DELIVERY_ACK_WAIT_S": "3",
                   "POSTBUS_LOG_LEVEL": "WARNING"}
VICTIMS = ("smtp-ingress", "mime-processor", "mailbox-store")


@dataclass
class Outcome:
    attempts: Counter[int] = field(default_factory=Counter)
    acked: set[int] = field(default_factory=set)
    gave_up: set[int] = field(default_factory=set)
    kills: list[str] = field(default_factory=list)
    copies: Counter[int] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def problems(self) -> list[str]:
        """Every broken promise, as text (empty when the run was clean)."""
        out = []
        for i in sorted(self.acked):
            if self.copies[i] < 1:
                out.append(f"message {i} was answered 250 but is not in the mailbox (lost)")
        for i, n in sorted(self.copies.items()):
            if n > self.attempts[i]:
                out.append(f"message {i} is stored {n} times from {self.attempts[i]} attempt(s)")
        return out


def provision(plat: Platform) -> None:
    with httpx.Client(base_url=plat.api("mailbox-store") + "/api/v1", timeout=30,
                      headers={"Authorization": f"Bearer {plat.token}"}) as api:
        api.post("/domains", json={"name": USER.split("@")[1]}).raise_for_status()
        api.post("/users", json={"address": USER, "password": PASSWORD}).raise_for_status()


def message(i: int) -> bytes:
    return (f"From: sender@example.net\r\nTo: {USER}\r\nSubject: crash loop {i}\r\n"
            f"Message-ID: <crash-{i}@example.net>\r\n\r\n"
            + f"message {i}\r\n" * 20).encode()


def _send_one(plat: Platform, i: int, out: Outcome, deadline: float) -> None:
    while time.monotonic() < deadline:
        with out.lock:
            out.attempts[i] += 1
        try:
            port = plat.port("smtp-ingress", "smtp_port")
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                s.sendmail("sender@example.net", [USER], message(i))
            with out.lock:
                out.acked.add(i)
            return
        except (OSError, smtplib.SMTPException):
            time.sleep(0.2 + random.random() * 0.3)  # 451, refused, reset: try again later
    with out.lock:
        out.gave_up.add(i)


def _killer(plat: Platform, out: Outcome, stop: threading.Event, interval_s: float,
            rnd: random.Random) -> None:
    while not stop.wait(interval_s * (0.5 + rnd.random())):
        name = rnd.choice(VICTIMS)
        proc = plat.procs[name]
        proc.kill()
        proc.wait(10)
        out.kills.append(name)
        plat.start_service(BY_NAME[name])
        plat.wait_ready(name, timeout=60)


def mailbox_ids(plat: Platform) -> Counter[int]:
    """Message number -> copies in the INBOX, from the Message-ID of every message."""
    m = imaplib.IMAP4("127.0.0.1", plat.port("imap-access", "imap_port"))
    try:
        m.login(USER, PASSWORD)
        typ, data = m.select("INBOX", readonly=True)
        assert typ == "OK", data
        if int(data[0]) == 0:
            return Counter()
        typ, data = m.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
        assert typ == "OK", data
        found = re.findall(rb"<crash-(\d+)@example\.net>", b"".join(
            part[1] for part in data if isinstance(part, tuple)))
        return Counter(int(x) for x in found)
    finally:
        m.logout()


def run(plat: Platform, *, messages: int, min_kills: int = 3, concurrency: int = 8,
        kill_every_s: float = 2.0, pace_s: float = 0.05, send_timeout_s: float = 300.0,
        settle_timeout_s: float = 120.0, seed: int = 25) -> Outcome:
    """Send at least ``messages`` (each client pausing ``pace_s`` between them), and go on
    until a killer thread, SIGKILLing a random victim about every ``kill_every_s``, has
    struck ``min_kills`` times; then wait until the mailbox stops changing and count."""
    out = Outcome()
    stop = threading.Event()
    killer = threading.Thread(target=_killer, name="killer", daemon=True,
                              args=(plat, out, stop, kill_every_s, random.Random(seed)))
    killer.start()
    deadline = time.monotonic() + send_timeout_s
    counter = iter(range(10**9))
    take = threading.Lock()

    def client() -> None:
        while time.monotonic() < deadline:
            with take:
                i = next(counter)
            if i >= messages and len(out.kills) >= min_kills:
                return
            _send_one(plat, i, out, deadline)
            time.sleep(pace_s)

    try:
        with ThreadPoolExecutor(concurrency) as pool:
            for f in [pool.submit(client) for _ in range(concurrency)]:
                f.result()
    finally:
        stop.set()
        killer.join(120)
    # everything acked must arrive; stop when the count is stable and covers the acks
    settle = time.monotonic() + settle_timeout_s
    last, stable_since = Counter[int](), time.monotonic()
    while time.monotonic() < settle:
        try:
            now = mailbox_ids(plat)
        except (OSError, imaplib.IMAP4.error):
            time.sleep(0.5)
            continue
        if now != last:
            last, stable_since = now, time.monotonic()
        elif out.acked <= set(now) and time.monotonic() - stable_since > 5:
            break
        time.sleep(0.5)
    out.copies = last
    return out

"""IMAP benchmark: FETCH of full bodies (messages/s, MB/s), FETCH FLAGS over 10,000 messages,
and login latency, against imap-access with the in-memory store (server in its own process,
a lean socket client here). Writes bench-results/imap.json.

    python tests/bench/bench_imap.py [--messages 10000] [--size 4096] [--rounds 3]
    python tests/bench/bench_imap.py --platform [--messages 2000]

``--platform`` measures the real path instead: nats-server, SeaweedFS, mailbox-store and
imap-access as processes (messages loaded with IMAP APPEND, bodies read from S3 through the
blob cache: the first round is cold, later rounds warm). Writes bench-results/imap-platform.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import socket
import statistics
import time
from pathlib import Path

USER, PASSWORD = "bench@example.test", "secret"


def make_message(i: int, size: int) -> bytes:
    head = (f"From: Sender {i} <s{i}@example.net>\r\nTo: {USER}\r\nSubject: message {i}\r\n"
            f"Message-ID: <{i}@bench>\r\nDate: Thu, 26 Nov 2026 10:00:00 +0000\r\n\r\n").encode()
    line = b"The quick brown fox jumps over the lazy dog 0123456789.\r\n"
    body = (line * (size // len(line) + 1))[:max(0, size - len(head) - 2)] + b"\r\n"
    return head + body


def serve(port_q: mp.Queue, n: int, size: int) -> None:  # type: ignore[type-arg]
    from postbus.imap_access.memory import MemoryPlatform
    from postbus.imap_access.server import ImapServer
    from postbus.imap_access.settings import Settings
    from postbus.kit.logging import configure
    from postbus.kit.settings import CommonSettings

    configure("WARNING", "console", service="imap-bench")

    async def main() -> None:
        plat = MemoryPlatform()
        acc = plat.add_user(USER, PASSWORD)
        for i in range(n):
            plat.deliver(acc, make_message(i, size), notify=False,
                         prefix=b"Delivered-To: bench@example.test\r\n")
        settings = Settings(common=CommonSettings(), auth_fail_delay_s=0)
        server = ImapServer(settings, plat, plat, plat, plat)
        [port] = await server.start("127.0.0.1", 0, None)
        port_q.put(port)
        await asyncio.Event().wait()

    try:
        import uvloop  # type: ignore[import-not-found]
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())


class Client:
    """Just enough IMAP to measure: send a command, read to its tagged reply, skipping
    literals by their announced length."""

    def __init__(self, port: int) -> None:
        self.s = socket.create_connection(("127.0.0.1", port))
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.f = self.s.makefile("rb", buffering=1 << 20)
        self.f.readline()
        self.n = 0

    def cmd(self, text: str) -> tuple[int, int]:
        """Returns (untagged responses, octets read)."""
        self.n += 1
        tag = b"t%d" % self.n
        self.s.sendall(tag + b" " + text.encode() + b"\r\n")
        count = octets = 0
        readline, read = self.f.readline, self.f.read
        while True:
            line = readline()
            if not line:
                raise ConnectionError("closed")
            octets += len(line)
            if line.startswith(tag + b" "):
                if not line.startswith(tag + b" OK"):
                    raise RuntimeError(line)
                return count, octets
            if line.startswith(b"* "):
                count += 1
            while line.endswith(b"}\r\n"):
                n = int(line[line.rindex(b"{") + 1:-3])
                octets += len(read(n))
                line = readline()
                octets += len(line)

    def close(self) -> None:
        self.s.close()


def start_platform_imap(args: argparse.Namespace) -> tuple[int, object]:
    import tempfile

    import httpx

    from postbus.kit.testing import RunningNats, RunningS3, start_platform
    from postbus.kit.topology import BY_NAME

    root = Path(tempfile.mkdtemp(prefix="bench-imap-"))
    nats, s3 = RunningNats(root), RunningS3(root)
    plat = start_platform(root / "p", nats, s3.endpoint,
                          services=(BY_NAME["mailbox-store"], BY_NAME["imap-access"]),
                          extra_env={"POSTBUS_LOG_LEVEL": "WARNING"})
    auth = {"Authorization": f"Bearer {plat.token}"}
    api = plat.api("mailbox-store")
    httpx.post(api + "/api/v1/domains", json={"name": "example.test"}, headers=auth).raise_for_status()
    httpx.post(api + "/api/v1/users", json={"address": USER, "password": PASSWORD},
               headers=auth).raise_for_status()
    port = plat.port("imap-access", "imap_port")
    c = Client(port)
    c.cmd(f"LOGIN {USER} {PASSWORD}")
    t0 = time.perf_counter()
    for i in range(args.messages):
        msg = make_message(i, args.size)
        c.cmd(f"APPEND INBOX {{{len(msg)}+}}\r\n" + msg.decode())
    print(f"appended {args.messages} in {time.perf_counter() - t0:.1f}s", flush=True)
    c.close()

    def stop() -> None:
        plat.stop()
        nats.stop()
        s3.stop()

    return port, stop


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=None)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--logins", type=int, default=200)
    ap.add_argument("--platform", action="store_true")
    args = ap.parse_args()
    if args.messages is None:
        args.messages = 2000 if args.platform else 10_000

    if args.platform:
        port, stop = start_platform_imap(args)
        proc = None
        args.logins = min(args.logins, 50)
    else:
        q: mp.Queue = mp.Queue()  # type: ignore[type-arg]
        proc = mp.Process(target=serve, args=(q, args.messages, args.size), daemon=True)
        proc.start()
        port = q.get(timeout=300)
    try:
        c = Client(port)
        c.cmd(f"LOGIN {USER} {PASSWORD}")
        c.cmd("EXAMINE INBOX")
        bodies, flags = [], []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            n, octets = c.cmd("UID FETCH 1:* BODY.PEEK[]")
            dt = time.perf_counter() - t0
            assert n == args.messages, n
            bodies.append((n / dt, octets / dt / 1e6))
            t0 = time.perf_counter()
            n, _ = c.cmd("FETCH 1:* (UID FLAGS)")
            flags.append(n / (time.perf_counter() - t0))
        c.close()
        logins = []
        for _ in range(args.logins):
            t0 = time.perf_counter()
            lc = Client(port)
            lc.cmd(f"LOGIN {USER} {PASSWORD}")
            logins.append((time.perf_counter() - t0) * 1000)
            lc.cmd("LOGOUT")
            lc.close()
    finally:
        if proc is not None:
            proc.terminate()
            proc.join(5)
        else:
            stop()  # type: ignore[operator]

    result = {
        "messages": args.messages, "message_size": args.size, "rounds": args.rounds,
        "fetch_body_cold_msgs_per_s": round(bodies[0][0]),
        "fetch_body_msgs_per_s": round(statistics.median(b[0] for b in bodies)),
        "fetch_body_mb_per_s": round(statistics.median(b[1] for b in bodies), 1),
        "fetch_flags_msgs_per_s": round(statistics.median(flags)),
        "login_ms_median": round(statistics.median(logins), 2),
        "login_ms_p95": round(sorted(logins)[int(len(logins) * 0.95) - 1], 2),
        "store": ("platform: mailbox-store (SQLite) + SeaweedFS + nats-server" if args.platform
                  else "in-memory (imap_access.memory), server in its own process"),
    }
    out = Path("bench-results")
    out.mkdir(exist_ok=True)
    (out / ("imap-platform.json" if args.platform else "imap.json")).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

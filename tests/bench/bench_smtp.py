"""smtp-ingress throughput: messages/s and accept latency at 1 and 20 concurrent connections,
2 KB and 100 KB messages, a new connection per message, against

* postbus: the real smtp-ingress (250 after the JetStream ack; embedded nats-server with
  sync_interval always; directory answered over the bus), in its own process;
* bare: aiosmtpd with a handler that discards every message (the Python ceiling).

Run: ``.venv/bin/python tests/bench/bench_smtp.py [--seconds 5 --repeats 3]``; prints the
median of the repeats (interleaved postbus/bare) and writes bench-results/smtp.json.
Server CPU per message (from /proc) is printed too: it depends far less than msgs/s on what
else the machine runs.
The load generator is one uvloop process speaking SMTP over raw asyncio streams, on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from proc_support import cpu_seconds

ROOT = Path(__file__).resolve().parents[2]
RCPT = "alice@example.test"


def _install_uvloop() -> None:
    try:
        import uvloop  # type: ignore[import-not-found]

        uvloop.install()
    except ImportError:
        pass


# ---------------------------------------------------------------- servers (child processes)
async def serve_postbus(nats_url: str, s3: str, port_file: Path, tmp: Path) -> None:
    from postbus.kit.blob import BlobStore
    from postbus.kit.bus import Bus
    from postbus.kit.settings import CommonSettings
    from postbus.proto import ALL_STREAMS
    from postbus.smtp_ingress.settings import Settings
    from postbus.smtp_ingress.testing import DirectoryTable, User, start_ingress

    common = CommonSettings(nats_url=nats_url, s3_endpoint=s3, s3_bucket="bench",
                            log_level="WARNING")
    bus = await Bus.connect(common, "bench-smtp")
    await bus.ensure_streams(ALL_STREAMS)
    blobs = BlobStore(common)
    await blobs.ensure_bucket()
    # nothing consumes the inbound stream here: no in-flow delay (it would hold MAIL FROM
    # once 100 messages wait, which is bench-e2e's business, not this one's)
    settings = Settings(common=common, smtp_port=0, submission_port=-1, smtps_port=-1,
                        max_connections_per_ip=10000, connection_rate_per_ip=0,
                        flow_backlog_threshold=0)
    table = DirectoryTable(users={RCPT: User("x")})
    running = await start_ingress(bus, blobs, settings, tmp, table)
    port_file.write_text(str(running.port("mx")))  # noqa: ASYNC240
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await running.ingress.stop()
    await bus.close()


async def serve_bare(port_file: Path) -> None:
    from aiosmtpd.smtp import SMTP

    class Discard:
        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
            return "250 OK"

    handler = Discard()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(handler, hostname="bare"), "127.0.0.1", 0)
    port_file.write_text(str(server.sockets[0].getsockname()[1]))  # noqa: ASYNC240
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()


# ---------------------------------------------------------------- load generator
def make_body(size: int) -> bytes:
    head = (b"From: bench@example.net\r\nTo: alice@example.test\r\nSubject: bench\r\n"
            b"Message-ID: <x@bench>\r\n\r\n")
    line = b"The quick brown fox jumps over the lazy dog 0123456789 abcdefghijklmnopq\r\n"
    n = max(0, (size - len(head)) // len(line))
    return head + line * n


async def _read_reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            return line


async def one_message(port: int, body: bytes) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await _read_reply(reader)
        writer.write(b"EHLO bench.example.net\r\n")
        await _read_reply(reader)
        # PIPELINING (RFC 2920): MAIL, RCPT and DATA in one write
        writer.write(b"MAIL FROM:<bench@example.net>\r\nRCPT TO:<" + RCPT.encode()
                     + b">\r\nDATA\r\n")
        for expect in (b"250", b"250", b"354"):
            r = await _read_reply(reader)
            if not r.startswith(expect):
                raise RuntimeError(r)
        started = time.perf_counter()
        writer.write(body + b".\r\n")
        r = await _read_reply(reader)
        latency = time.perf_counter() - started
        if not r.startswith(b"250"):
            raise RuntimeError(r)
        writer.write(b"QUIT\r\n")
        await _read_reply(reader)
        return latency
    finally:
        writer.close()


async def run_load(port: int, size: int, concurrency: int, seconds: float) -> dict[str, float]:
    body = make_body(size)
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            try:
                latencies.append(await one_message(port, body))
            except Exception:
                errors += 1
                await asyncio.sleep(0.01)

    for _ in range(min(concurrency, 5)):  # warm-up (directory cache, JIT-less but still)
        await one_message(port, body)
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "messages": len(latencies),
        "errors": errors,
        "msgs_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 2) if latencies else 0,
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2) if latencies else 0,
    }


# ---------------------------------------------------------------- orchestration
def _spawn(args: list[str], port_file: Path, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.time() + 60
    while time.time() < deadline:
        if port_file.exists() and port_file.read_text():
            return proc, int(port_file.read_text())
        if proc.poll() is not None:
            raise RuntimeError(f"{args[0]} died:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    raise TimeoutError(args[0])


async def purge_inbound(nats_url: str) -> int:
    from postbus.kit.bus import Bus
    from postbus.kit.settings import CommonSettings
    from postbus.proto.mail import INBOUND_STREAM

    bus = await Bus.connect(CommonSettings(nats_url=nats_url), "bench-admin")
    try:
        info = await bus.js.stream_info(INBOUND_STREAM.name)
        n = int(info.state.messages)
        await bus.js.purge_stream(INBOUND_STREAM.name)
        return n
    finally:
        await bus.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=3, help="runs per case; medians are printed")
    ap.add_argument("--out", default=str(ROOT / "bench-results" / "smtp.json"))
    args = ap.parse_args()

    from postbus.kit.testing import RunningNats, RunningS3

    tmp = Path(tempfile.mkdtemp(prefix="bench-smtp-"))
    # without per-service NATS users: the bench's one process creates streams and purges
    # them between runs, which only an admin may (the platform tests run with the users)
    nats = RunningNats(tmp, auth=False)
    s3 = RunningS3(tmp)
    procs: list[subprocess.Popen[bytes]] = []
    results: dict[str, object] = {"seconds_per_run": args.seconds, "repeats": args.repeats,
                                  "runs": []}
    try:
        pb, pb_port = _spawn(["serve-postbus", nats.url, s3.endpoint, str(tmp / "pb.port"),
                              str(tmp)], tmp / "pb.port", tmp / "postbus.log")
        procs.append(pb)
        bare, bare_port = _spawn(["serve-bare", str(tmp / "bare.port")], tmp / "bare.port",
                                 tmp / "bare.log")
        procs.append(bare)
        _install_uvloop()
        runs: list[dict[str, object]] = []
        for size in (2 * 1024, 100 * 1024):
            for conc in (1, 20):
                row: dict[str, object] = {"size": size, "concurrency": conc}
                samples: dict[str, list[dict[str, float]]] = {"postbus": [], "bare": []}
                for _ in range(args.repeats):  # interleaved, so both see the same machine
                    for name, port, pid in (("postbus", pb_port, pb.pid),
                                            ("bare", bare_port, bare.pid)):
                        cpu0, ncpu0 = cpu_seconds(pid), cpu_seconds(nats.proc.pid)
                        r = asyncio.run(run_load(port, size, conc, args.seconds))
                        n = max(1, int(r["messages"]))
                        r["server_cpu_us_per_msg"] = round((cpu_seconds(pid) - cpu0) / n * 1e6, 1)
                        if name == "postbus":
                            r["nats_cpu_us_per_msg"] = round(
                                (cpu_seconds(nats.proc.pid) - ncpu0) / n * 1e6, 1)
                            stored = asyncio.run(purge_inbound(nats.url))
                            # every 250 is in the stream (+ the warm-up messages)
                            r["in_stream"] = stored
                            r["lost"] = max(0, n - stored) if r["messages"] else 0
                        samples[name].append(r)
                for name, rs in samples.items():
                    row[name] = {k: round(statistics.median(x[k] for x in rs), 2) for k in rs[0]}
                    row[name + "_samples"] = rs
                pbr, bar = row["postbus"], row["bare"]
                row["ratio"] = round(pbr["msgs_per_s"] / bar["msgs_per_s"], 3)  # type: ignore[index]
                runs.append(row)
                print(f"{size // 1024:>4} KB  conc {conc:>2}  postbus {pbr['msgs_per_s']:>8} msg/s "  # type: ignore[index]
                      f"p50 {pbr['p50_ms']:>6} ms p99 {pbr['p99_ms']:>7} ms "  # type: ignore[index]
                      f"cpu {pbr['server_cpu_us_per_msg']} us/msg (+nats {pbr['nats_cpu_us_per_msg']}) "  # type: ignore[index]
                      f"errors {pbr['errors']} lost {pbr['lost']}  |  bare "  # type: ignore[index]
                      f"{bar['msgs_per_s']:>8} msg/s cpu {bar['server_cpu_us_per_msg']} us/msg  |  "  # type: ignore[index]
                      f"ratio {row['ratio']}", flush=True)  # type: ignore[index]
        results["runs"] = runs
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print(f"wrote {out}")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        s3.stop()
        nats.stop()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve-postbus":
        _install_uvloop()
        if os.environ.get("BENCH_PROFILE"):  # a cProfile of the server, for tuning
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
            asyncio.run(serve_postbus(sys.argv[2], sys.argv[3], Path(sys.argv[4]),
                                      Path(sys.argv[5])))
            prof.disable()
            prof.dump_stats(os.environ["BENCH_PROFILE"])
        else:
            asyncio.run(serve_postbus(sys.argv[2], sys.argv[3], Path(sys.argv[4]),
                                      Path(sys.argv[5])))
    elif len(sys.argv) > 1 and sys.argv[1] == "serve-bare":
        _install_uvloop()
        asyncio.run(serve_bare(Path(sys.argv[2])))
    else:
        os.environ.setdefault("POSTBUS_LOG_LEVEL", "WARNING")
        main()

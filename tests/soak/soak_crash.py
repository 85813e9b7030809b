"""Crash soak: the real platform under SMTP load while smtp-ingress, mime-processor and
mailbox-store are killed with SIGKILL again and again (tests/e2e/crashloop.py).

    python tests/soak/soak_crash.py [--messages 3000] [--min-kills 30] [--kill-every 3]

Exits 1 when a message answered 250 is missing or an SMTP attempt was stored twice.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from crashloop import FAST_REDELIVERY, provision, run  # noqa: E402

from postbus.kit.testing import RunningNats, RunningS3, start_platform  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--min-kills", type=int, default=30)
    ap.add_argument("--kill-every", type=float, default=3.0, help="seconds, on average")
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="postbus-soak-"))
    nats, s3 = RunningNats(root), RunningS3(root)
    plat = start_platform(root / "platform", nats, s3.endpoint, extra_env=FAST_REDELIVERY)
    t0 = time.monotonic()
    try:
        provision(plat)
        out = run(plat, messages=args.messages, min_kills=args.min_kills,
                  concurrency=args.concurrency, kill_every_s=args.kill_every,
                  send_timeout_s=3600, settle_timeout_s=300)
    finally:
        plat.stop()
        s3.stop()
        nats.stop()
    problems = out.problems()
    summary = {
        "seconds": round(time.monotonic() - t0),
        "messages_sent": len(out.attempts), "acked_250": len(out.acked),
        "gave_up": len(out.gave_up), "smtp_attempts": sum(out.attempts.values()),
        "retried_messages": sum(1 for n in out.attempts.values() if n > 1),
        "stored": sum(out.copies.values()),
        "stored_twice_after_a_retry": sum(1 for i, n in out.copies.items()
                                          if n > 1 and out.attempts[i] > 1),
        "kills": dict(Counter(out.kills)), "problems": problems[:20],
        "logs": str(root / "platform"),
    }
    print(json.dumps(summary, indent=2))
    return 1 if problems or out.gave_up else 0


if __name__ == "__main__":
    sys.exit(main())

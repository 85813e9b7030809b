"""No lost and no doubled mail while services crash: SMTP traffic against the real platform
while smtp-ingress, mime-processor and mailbox-store are killed with SIGKILL and restarted.
The long version is `make soak` (tests/soak/soak_crash.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from crashloop import FAST_REDELIVERY, provision, run  # tests/e2e is on sys.path

from postbus.kit.testing import RunningNats, RunningS3, start_platform

pytestmark = pytest.mark.timeout(600)


def test_mail_survives_sigkill_of_every_stage(nats_server: RunningNats, s3_server: RunningS3,
                                              tmp_path: Path) -> None:
    plat = start_platform(tmp_path / "platform", nats_server, s3_server.endpoint,
                          extra_env=FAST_REDELIVERY)
    try:
        provision(plat)
        out = run(plat, messages=150, min_kills=4, concurrency=6, kill_every_s=2.5)
    finally:
        plat.stop()
        s3_server.drop_bucket(plat.common_env["POSTBUS_S3_BUCKET"])
    assert len(out.kills) >= 4, out.kills
    assert not out.gave_up, f"clients gave up on {sorted(out.gave_up)}"
    assert len(out.acked) >= 150
    assert out.problems() == [], out.problems()

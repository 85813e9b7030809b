"""The six services, their modules and default ports: one table for `postbus run`, the
test platform, the README and the Kubernetes manifests to agree on."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServiceSpec:
    name: str  # smtp-ingress
    module: str  # postbus.smtp_ingress
    mgmt_port: int
    listeners: dict[str, int] = field(default_factory=dict)  # setting name -> default port
    uses_database: bool = False
    # a setting naming a directory for bodies spooled to disk, and that disk's bound (its
    # Kubernetes emptyDir): smtp-ingress spools what is larger than it may hold in memory
    spool_setting: str = ""
    spool_size: str = ""

    @property
    def env_prefix(self) -> str:
        return "POSTBUS_" + self.name.upper().replace("-", "_") + "_"


SERVICES: tuple[ServiceSpec, ...] = (
    # mailbox-store first: the others ask its directory when they start taking traffic
    ServiceSpec("mailbox-store", "postbus.mailbox_store", 8103, uses_database=True),
    ServiceSpec("mime-processor", "postbus.mime_processor", 8102),
    ServiceSpec("relay", "postbus.relay", 8104),
    ServiceSpec("smtp-ingress", "postbus.smtp_ingress", 8101,
                {"smtp_port": 2525, "submission_port": 2587, "smtps_port": 2465},
                spool_setting="spool_dir", spool_size="1280Mi"),  # spool_max_bytes 1 GiB + slack
    ServiceSpec("imap-access", "postbus.imap_access", 8105, {"imap_port": 2143, "imaps_port": 2993}),
    ServiceSpec("pop3-access", "postbus.pop3_access", 8106, {"pop3_port": 2110, "pop3s_port": 2995}),
)

BY_NAME = {s.name: s for s in SERVICES}

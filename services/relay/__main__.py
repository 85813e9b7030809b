"""``python -m postbus.relay``: settings from the environment, then the runtime."""

from __future__ import annotations

from postbus.kit import runtime
from postbus.relay.service import make_setup
from postbus.relay.settings import Settings


def main() -> None:
    settings = Settings()
    runtime.main("relay", settings.common, settings.mgmt_port, make_setup(settings))


if __name__ == "__main__":
    main()

"""``python -m postbus.mime_processor``: settings from the environment, then the runtime."""

from __future__ import annotations

from postbus.kit import runtime
from postbus.mime_processor.service import make_setup
from postbus.mime_processor.settings import Settings


def main() -> None:
    settings = Settings()
    runtime.main("mime-processor", settings.common, settings.mgmt_port, make_setup(settings))


if __name__ == "__main__":
    main()

"""The `postbus` command: `postbus run` starts the platform on this machine; the other
commands manage domains, users, aliases and mail through mailbox-store's API."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from postbus.cli import admin

app = typer.Typer(help="Postbus: a mail platform on NATS.", no_args_is_help=True,
                  add_completion=False)


@app.command()
def run(run_dir: Annotated[Path, typer.Option(
        envvar="POSTBUS_RUN_DIR", help="Where data, logs and the admin token live.")] = Path(".run"),
        ) -> None:
    """Start NATS, S3 and every service on this machine (what `make run` does)."""
    from postbus.cli.devrun import run as run_platform

    raise typer.Exit(run_platform(run_dir))


@app.command("k8s-secrets")
def k8s_secrets(namespace: Annotated[str, typer.Option(help="Namespace of the Secrets.")] = "postbus",
                ) -> None:
    """Print the NATS Secrets for Kubernetes with new random passwords: ``nats-auth`` (the
    users and their permissions, included by the NATS config) and ``postbus-nats-<service>``
    (each service's own user). Pipe to ``kubectl apply -f -``; run again to rotate."""
    from postbus.cli.k8s import nats_secrets

    typer.echo(nats_secrets(namespace))


admin.register(app)

if __name__ == "__main__":
    app()

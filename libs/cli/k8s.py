"""Secrets for the Kubernetes manifests in k8s/: NATS users per service (kit.natsauth)."""

from __future__ import annotations

import json
import secrets

from postbus.kit.natsauth import authorization_block
from postbus.kit.topology import SERVICES


def nats_secrets(namespace: str = "postbus") -> str:
    """YAML of the ``nats-auth`` Secret and one ``postbus-nats-<service>`` Secret per
    service, with new random passwords (the same passwords in both)."""
    passwords = {s.name: secrets.token_urlsafe(24) for s in SERVICES}
    docs = [_secret("nats-auth", namespace, {"auth.conf": authorization_block(
        passwords, admin_password=secrets.token_urlsafe(24))})]
    for name, pw in passwords.items():
        docs.append(_secret(f"postbus-nats-{name}", namespace,
                            {"POSTBUS_NATS_USER": name, "POSTBUS_NATS_PASSWORD": pw}))
    return "---\n".join(docs)


def _secret(name: str, namespace: str, data: dict[str, str]) -> str:
    # JSON is YAML: no quoting rules to get wrong for passwords or the NATS config
    return json.dumps({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                       "metadata": {"name": name, "namespace": namespace,
                                    "labels": {"app.kubernetes.io/part-of": "postbus"}},
                       "stringData": data}, indent=2) + "\n"

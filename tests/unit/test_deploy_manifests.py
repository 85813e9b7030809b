"""The generated Kubernetes manifests match the service table, and parse as YAML."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from postbus.kit.topology import SERVICES

ROOT = Path(__file__).resolve().parents[2]


def test_services_yaml_is_generated_from_topology() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_k8s", ROOT / "deploy" / "gen_k8s.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert (ROOT / "k8s" / "base" / "services.yaml").read_text() == mod.render(), \
        "run `python deploy/gen_k8s.py`"


def test_every_service_has_deployment_service_hpa_pdb_with_probes() -> None:
    docs = list(yaml.safe_load_all((ROOT / "k8s" / "base" / "services.yaml").read_text()))
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for s in SERVICES:
        for kind in ("Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget"):
            assert (kind, s.name) in kinds
        assert ("Service", f"{s.name}-mgmt") in kinds
        assert (("Service", s.name) in kinds) == bool(s.listeners)
    for d in docs:
        if d["kind"] == "Deployment":
            c = d["spec"]["template"]["spec"]["containers"][0]
            assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
            assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for f in (ROOT / "k8s").rglob("*.yaml"):
        list(yaml.safe_load_all(f.read_text()))
    list(yaml.safe_load_all((ROOT / "deploy" / "compose.yaml").read_text()))


def test_smtp_ingress_spools_to_a_bounded_empty_dir() -> None:
    """Issue 8.6: bodies past the memory budget go to disk; on Kubernetes that disk is an
    emptyDir with a size limit, named by the spool setting, not the node's own disk."""
    docs = list(yaml.safe_load_all((ROOT / "k8s" / "base" / "services.yaml").read_text()))
    dep = next(d for d in docs if d["kind"] == "Deployment"
               and d["metadata"]["name"] == "smtp-ingress")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    env = {e["name"]: e["value"] for e in c.get("env", [])}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    # a directory below the mount: the service creates it as its own, mode 0700
    assert env["POSTBUS_SMTP_INGRESS_SPOOL_DIR"].startswith(mounts["spool"] + "/")
    volume = next(v for v in pod["volumes"] if v["name"] == "spool")
    assert volume["emptyDir"]["sizeLimit"] == c["resources"]["limits"]["ephemeral-storage"]


def test_management_ports_are_never_on_a_mail_service() -> None:
    """Issue 8.8: the production overlay turns the mail Services into LoadBalancers, which
    also carried the management port; compose published 8103 on every interface."""
    docs = [d for d in yaml.safe_load_all((ROOT / "k8s" / "base" / "services.yaml").read_text()) if d]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for s in SERVICES:
        mgmt = services[f"{s.name}-mgmt"]
        assert mgmt["spec"]["type"] == "ClusterIP"
        assert [p["name"] for p in mgmt["spec"]["ports"]] == ["mgmt"]
        if s.listeners:
            assert "mgmt" not in [p["name"] for p in services[s.name]["spec"]["ports"]]
    overlay = (ROOT / "k8s" / "overlays" / "production" / "kustomization.yaml").read_text()
    for name in ("smtp-ingress", "imap-access", "pop3-access"):
        block = overlay.split(f"name: {name}}}", 1)[1].split("- target:", 1)[0]
        assert "LoadBalancer" in block and "externalTrafficPolicy" in block, name
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    for svc in compose["services"].values():
        for port in svc.get("ports", []):
            if int(port.rsplit(":", 1)[1]) in {x.mgmt_port for x in SERVICES}:
                assert port.startswith("127.0.0.1:"), port


def test_nats_has_users_and_only_postbus_reaches_it() -> None:
    """Issue 8.3: the NATS StatefulSet had no authorization and there was no NetworkPolicy."""
    import json

    from postbus.cli.k8s import nats_secrets
    from postbus.kit.natsauth import GRANTS

    base = ROOT / "k8s" / "base"
    nats = list(yaml.safe_load_all((base / "nats.yaml").read_text()))
    conf = next(d for d in nats if d["kind"] == "ConfigMap")["data"]["nats.conf"]
    assert 'include "auth/auth.conf"' in conf
    sts = next(d for d in nats if d["kind"] == "StatefulSet")
    assert {"name": "auth", "secret": {"secretName": "nats-auth"}} in sts["spec"]["template"]["spec"]["volumes"]
    for d in yaml.safe_load_all((base / "services.yaml").read_text()):
        if d and d["kind"] == "Deployment":
            refs = [e["secretRef"]["name"] for e in
                    d["spec"]["template"]["spec"]["containers"][0]["envFrom"] if "secretRef" in e]
            assert f"postbus-nats-{d['metadata']['name']}" in refs
    policies = list(yaml.safe_load_all((base / "network.yaml").read_text()))
    assert {p["metadata"]["name"] for p in policies} == {"nats-from-postbus-only",
                                                         "mgmt-from-postbus-only"}
    assert "network.yaml" in (base / "kustomization.yaml").read_text()
    secrets = [json.loads(x) for x in nats_secrets("postbus").split("---\n")]
    auth = secrets[0]["stringData"]["auth.conf"]
    users = {s["stringData"]["POSTBUS_NATS_USER"]: s["stringData"]["POSTBUS_NATS_PASSWORD"]
             for s in secrets[1:]}
    assert set(users) == set(GRANTS)
    assert all(pw in auth for pw in users.values())  # one set of passwords in both
    assert nats_secrets("postbus") != nats_secrets("postbus")  # new ones each time
    prod = (ROOT / "k8s" / "overlays" / "production" / "kustomization.yaml").read_text()
    assert "tls://" in prod and "nats-tls" in prod and "tls {" in prod


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("target", ["base", "overlays/production"])
def test_kustomize_builds(target: str) -> None:
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / "k8s" / target)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    kinds = {d["kind"] for d in yaml.safe_load_all(out.stdout) if d}
    assert {"Deployment", "Service", "StatefulSet", "NetworkPolicy"} <= kinds


def test_api_docs_pages_off_in_kubernetes() -> None:
    """Issue 8 (low): /docs loads its assets from a CDN."""
    from fastapi.testclient import TestClient

    from postbus.kit.mgmt import create_app

    cfg = yaml.safe_load((ROOT / "k8s" / "base" / "config.yaml").read_text())
    assert cfg["data"]["POSTBUS_API_DOCS"] == "false"
    off = TestClient(create_app("x", checks={}, routers=[], token_source=lambda: "t", docs=False))
    assert off.get("/docs").status_code == 404 and off.get("/redoc").status_code == 404
    assert off.get("/openapi.json").status_code == 200
    on = TestClient(create_app("x", checks={}, routers=[], token_source=lambda: "t"))
    assert on.get("/docs").status_code == 200

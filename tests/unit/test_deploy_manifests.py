"""The generated Kubernetes manifests match the service table, and parse as YAML."""

from pathlib import Path

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

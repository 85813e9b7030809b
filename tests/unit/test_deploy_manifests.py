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
        for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"):
            assert (kind, s.name) in kinds
    for d in docs:
        if d["kind"] == "Deployment":
            c = d["spec"]["template"]["spec"]["containers"][0]
            assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
            assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for f in (ROOT / "k8s").rglob("*.yaml"):
        list(yaml.safe_load_all(f.read_text()))
    list(yaml.safe_load_all((ROOT / "deploy" / "compose.yaml").read_text()))

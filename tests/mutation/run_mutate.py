"""Mutation testing of the pure policy and protocol modules with cosmic-ray: each module is
mutated in place, one mutant at a time, and its own unit tests must fail on every mutant.
Prints the survivors (mutants no test noticed) per module; writes bench-results/mutate.json.

    python tests/mutation/run_mutate.py [module ...]     (make mutate)

A survivor is either a missing test or an equivalent mutant (a change with no visible
effect); docs/testing.md lists the ones that remain and why.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
# module -> the unit tests that pin it (fast: every mutant runs them)
TARGETS = {
    "services/smtp-ingress/policy.py": ["tests/unit/test_smtp_policy.py"],
    "services/pop3-access/policy.py": ["tests/unit/test_pop3_policy.py"],
    "services/relay/policy.py": ["tests/unit/test_relay_policy.py"],
    "services/mime-processor/policy.py": ["tests/unit/test_mime_processor_policy.py"],
    "libs/protocols/pop3.py": ["tests/unit/test_pop3_parser.py"],
    "libs/kit/net.py": ["tests/unit/test_kit_net.py"],
}


def run(module: str, tests: list[str], work: Path) -> dict[str, object]:
    cfg = work / (Path(module).stem + "-" + Path(module).parent.name + ".toml")
    db = cfg.with_suffix(".sqlite")
    cfg.write_text(
        "[cosmic-ray]\n"
        f'module-path = "{module}"\n'
        "timeout = 60.0\n"
        "excluded-modules = []\n"
        f'test-command = "{PY} -m pytest -x -q -p no:cacheprovider -p no:randomly '
        f'{" ".join(tests)}"\n'
        "[cosmic-ray.distributor]\n"
        'name = "local"\n')
    subprocess.run(["cosmic-ray", "init", str(cfg), str(db), "--force"], cwd=ROOT, check=True,
                   capture_output=True)
    subprocess.run(["cosmic-ray", "exec", str(cfg), str(db)], cwd=ROOT, check=True,
                   capture_output=True)
    dump = subprocess.run(["cosmic-ray", "dump", str(db)], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    total = killed = 0
    survivors = []
    for line in dump.splitlines():
        work_item, result = json.loads(line)
        if result is None:
            continue
        total += 1
        if result.get("test_outcome") == "killed":
            killed += 1
        elif result.get("test_outcome") == "survived":
            m = work_item["mutations"][0]
            survivors.append(f"{m['module_path']}:{m['start_pos'][0]} {m['operator_name']} "
                             f"#{m['occurrence']}")
    return {"module": module, "mutants": total, "killed": killed, "survivors": survivors}


def main() -> int:
    chosen = sys.argv[1:] or list(TARGETS)
    results = []
    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:
        for module in chosen:
            r = run(module, TARGETS[module], Path(tmp))
            results.append(r)
            print(f"{module}: {r['killed']}/{r['mutants']} killed, "
                  f"{len(r['survivors'])} survived", flush=True)  # type: ignore[arg-type]
            for s in r["survivors"]:  # type: ignore[attr-defined]
                print(f"  survived: {s}")
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "mutate.json").write_text(json.dumps(results, indent=2))
    # the tree must be as it was: cosmic-ray restores every file after its mutant
    dirty = subprocess.run(["git", "status", "--porcelain", "--", *chosen], cwd=ROOT,
                           capture_output=True, text=True).stdout
    if dirty.strip():
        print("a mutated file was left behind:\n" + dirty)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

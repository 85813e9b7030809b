"""The checked-in JSON Schemas in proto/schemas match the pydantic models."""

from postbus.proto import REGISTRY
from postbus.proto.schema import main


def test_schemas_match_code() -> None:
    assert main(["--check"]) == 0, "run `make schemas` and commit proto/schemas"


def test_every_subject_is_versioned_and_unique() -> None:
    names = [s.name for s in REGISTRY.subjects] + [r.name for r in REGISTRY.rpcs]
    assert len(names) == len(set(names))
    for name in names:
        assert name == name.lower()
        assert ".v1" in name, name


def test_stream_subjects_do_not_overlap() -> None:
    prefixes = [subj for s in REGISTRY.streams for subj in s.subjects]
    assert len(prefixes) == len(set(prefixes))
    for s in REGISTRY.subjects:
        if s.stream is not None:
            assert any(s.name.startswith(p.rstrip(">")) for p in s.stream.subjects), s.name

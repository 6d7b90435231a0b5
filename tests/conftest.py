import os
from pathlib import Path

import pytest

# Tests never reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
# Annotation fixtures, copied into the repository with their provenance and licence (PROVENANCE.md in each folder).
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    assert FIXTURES.is_dir(), f"test fixtures not found at {FIXTURES}"
    return FIXTURES


@pytest.fixture(scope="module")
def mini(fixtures_dir):
    """The RefCOCOg (umd) mini fixture: refs, instances, per-ref verification records and its folder."""
    import json
    import pickle

    folder = fixtures_dir / "refcocog_umd_mini"
    with open(folder / "refs(umd).p", "rb") as f:
        refs = pickle.load(f)
    instances = json.loads((folder / "instances.json").read_text())
    verification = {v["ref_id"]: v for v in json.loads((folder / "verification.json").read_text())}
    return {"refs": refs, "instances": instances, "verification": verification, "folder": folder}

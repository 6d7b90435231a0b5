"""`mllmseg release`: real release folders verified in a real `python -I` subprocess; the upload goes through
huggingface_hub's own HTTP client with its transport replaced (`set_client_factory` + `httpx2.MockTransport`), so
everything above the socket (create_repo, preupload, README validation, the NDJSON commit) runs for real."""
import base64
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mllmseg.cli import main
from mllmseg.hub.release import ReleaseError, check_base_model, remote_code_closure, verify_release

REPO_ROOT_FILES = {
    "README.md", "compat_mllmseg.py", "config.json", "configuration_mllmseg.py",
    "conversation_mllmseg.py", "generation_config.json", "image_processing_mllmseg.py", "inference_mllmseg.py",
    "mask_decoder_mllmseg.py", "model.safetensors", "modeling_mllmseg.py", "pipeline_mllmseg.py", "processing_mllmseg.py",
    "processor_config.json", "tokenizer.json", "tokenizer_config.json", "self1e_head_mllmseg.py",
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from mllmseg.tiny import build_processor, build_tiny_model

    folder = tmp_path_factory.mktemp("ckpt") / "tiny-mllmseg"
    model, tokenizer = build_tiny_model(seed=0)
    model.save_pretrained(folder)
    build_processor(tokenizer, model.config).save_pretrained(folder)
    (folder / "trainer_state.json").write_text("{}")  # not part of a release: left out
    return folder


@pytest.fixture(scope="module")
def eval_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "refcocog_val_fast.json"
    metrics = {"cIoU": 0.799, "gIoU_per_expression": 0.81, "gIoU_per_image": 0.805, "prec@0.5": 0.9,
               "N-acc": None, "T-acc": None, "n_expressions": 28}
    path.write_text(json.dumps({"dataset": "refcocog", "split": "val", "mode": "fast", "metrics": metrics}))
    return path


@pytest.fixture(scope="module")
def dry_run(checkpoint, eval_json, tmp_path_factory):
    out = tmp_path_factory.mktemp("rel") / "release"
    proc = subprocess.run(
        [sys.executable, "-m", "mllmseg", "release", str(checkpoint), "--repo-id", "me/tiny-mllmseg", "--dry-run",
         "--output-dir", str(out), "--eval-json", str(eval_json), "--base-model", "me/tiny-internvl-base"],
        capture_output=True, text=True, timeout=300,
    )
    return proc, out


def test_dry_run_builds_and_verifies(dry_run, checkpoint):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in out.iterdir()} == REPO_ROOT_FILES
    assert "verified: MLLMSegForConditionalGeneration + MLLMSegProcessor" in proc.stdout
    assert "no missing/unexpected keys" in proc.stdout
    assert "dry run: nothing uploaded" in proc.stdout
    assert "trainer_state.json" in proc.stdout  # reported as not released
    assert (out / "model.safetensors").read_bytes() == (checkpoint / "model.safetensors").read_bytes()
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "model-index:" in card and "base_model: me/tiny-internvl-base" in card
    assert "| RefCOCOg | val | fast | 0.799 |" in card
    # datasets: means training data on the Hub; nothing recorded how this checkpoint was trained
    assert "datasets:" not in card.split("---")[1] and "No training record came with this release" in card
    assert "base model me/tiny-internvl-base: not a known InternVL release, its architecture was not checked" in proc.stdout
    assert "verifying: loading the folder alone" in proc.stdout


def test_card_and_command_state_one_parameter_count(dry_run, checkpoint):
    """The card's count is the model's parameters (BatchNorm statistics are saved tensors, not parameters), the
    same number the verification's loaded model reports."""
    from safetensors import safe_open

    from mllmseg.remote_code.modeling_mllmseg import MLLMSegForConditionalGeneration

    proc, out = dry_run
    expected = MLLMSegForConditionalGeneration.from_pretrained(checkpoint).num_parameters()
    with safe_open(str(checkpoint / "model.safetensors"), framework="np") as f:
        stored = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    assert stored > expected  # the decoder's BatchNorm buffers are stored too
    card = (out / "README.md").read_text()
    assert re.search(r"\| Parameters \| [0-9.]+K \(([0-9,]+)\) \|", card).group(1) == f"{expected:,}"
    assert f"({expected:,} parameters, no missing/unexpected keys" in proc.stdout


def test_base_model_is_checked_against_the_architecture(checkpoint, tmp_path, capsys):
    """A published InternVL named as the base must have the checkpoint's widths; a tiny Qwen2 model is not an
    InternVL2.5-8B fine-tune."""
    rc = main(["release", str(checkpoint), "--repo-id", "me/x", "--dry-run", "--skip-verify",
               "--output-dir", str(tmp_path / "o"), "--base-model", "OpenGVLab/InternVL2_5-8B"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert "--base-model OpenGVLab/InternVL2_5-8B is a llama model of width 4096" in err and "width 64" in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    config = {"text_config": {"model_type": "qwen2", "hidden_size": 896}, "vision_config": {"hidden_size": 1024}}
    assert "architecture matches (qwen2, width 896" in check_base_model("OpenGVLab/InternVL2_5-1B", config)
    assert "architecture matches" in check_base_model("OpenGVLab/InternVL3-1B-hf", config)
    with pytest.raises(ReleaseError, match="is a llama model of width 4096"):
        check_base_model("jcwang0602/MLLMSeg_InternVL2_5_8B_RES", config)  # named after its base
    with pytest.raises(ReleaseError, match="must be a Hub model id"):
        check_base_model(str(checkpoint), config)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A real two-step `mllmseg train` run (tiny model, synthetic data): `<run>/train_summary.json` + `<run>/final`."""
    run = tmp_path_factory.mktemp("run") / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "mllmseg", "train", "tiny", "--output-dir", str(run), "training.max_steps=2",
         "training.save_strategy=no", "training.logging_steps=1", "training.warmup_steps=0",
         "data.train.num_images=16"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_card_training_section_comes_from_the_run(trained_run, tmp_path):
    out = tmp_path / "release"
    notes = tmp_path / "notes.md"
    notes.write_text("Trained as a smoke test; not a useful model.")
    proc = subprocess.run(
        [sys.executable, "-m", "mllmseg", "release", str(trained_run / "final"), "--repo-id", "me/tiny-run",
         "--dry-run", "--skip-verify", "--output-dir", str(out), "--training-notes", str(notes)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((trained_run / "train_summary.json").read_text())
    assert f"training section: {(trained_run / 'train_summary.json').resolve()}" in proc.stdout
    card = (out / "README.md").read_text()
    section = card.split("## Training\n")[1].split("## Limitations")[0]
    assert f"recipe `tiny`) for {summary['global_step']} optimiser steps" in section
    assert f"mean training loss {summary['train_loss']:.4f}" in section
    assert "Synthetic shapes (mllmseg), 16 generated scenes" in section and "full fine-tuning (no LoRA)" in section
    assert f"{summary['trainable']['trainable']:,} of {summary['trainable']['all']:,} parameters trained" in section
    assert f"learning rate {summary['recipe']['training']['learning_rate']}" in section
    assert "Trained as a smoke test; not a useful model." in section
    assert "LoRA r=64" not in card and "50k steps" not in card  # the reference's recipe is not claimed
    assert "datasets:" not in card.split("---")[1]  # synthetic data has no Hub id


def test_the_runs_summary_is_found_whatever_folder_the_run_was_started_from(tmp_path, monkeypatch):
    """`train_summary.json` records `final` as the run was given it: relative to the folder the run started in
    (`mllmseg train tiny_base` -> "outputs/tiny_base/final"). From any other folder it is still the run's."""
    from mllmseg.hub.release import find_training_summary

    run = tmp_path / "outputs" / "tiny_base"
    (run / "final").mkdir(parents=True)
    (run / "train_summary.json").write_text(json.dumps({"final": "outputs/tiny_base/final", "recipe": {}}))
    (run / "other").mkdir()
    for cwd in (tmp_path, run, tmp_path / "outputs"):
        monkeypatch.chdir(cwd)
        assert find_training_summary(run / "final") == (run / "train_summary.json").resolve()
        assert find_training_summary(run / "other") is None  # a sibling folder is not the run's final


def test_verify_reports_keys_and_blocks_the_package(dry_run, tmp_path):
    """The verifier itself: a fresh interpreter that cannot import mllmseg, and key checks."""
    _, out = dry_run
    report = verify_release(out)
    assert report["missing_keys"] == [] and report["unexpected_keys"] == []
    assert report["mllmseg_modules"] == [] and "transformers_modules" in report["model_class"]
    # an extra tensor in the weights is an unexpected key
    from safetensors.torch import load_file, save_file
    import torch

    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    weights = load_file(bad / "model.safetensors")
    weights["mask_decoder.bogus_extra"] = torch.zeros(3)
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ReleaseError, match="unexpected keys: .*mask_decoder.bogus_extra"):
        verify_release(bad)
    # remote code that reaches into the package fails to load: mllmseg is blocked in the verifier
    leaky = tmp_path / "leaky"
    shutil.copytree(out, leaky)
    code = leaky / "mask_decoder_mllmseg.py"
    code.write_text("import mllmseg.tiny\n" + code.read_text())
    with pytest.raises(ReleaseError, match="fresh interpreter failed"):
        verify_release(leaky)


def _broken_copy(checkpoint, tmp_path, name):
    folder = tmp_path / name
    shutil.copytree(checkpoint, folder)
    return folder


def test_bad_inputs_give_one_line_errors(checkpoint, tmp_path, capsys):
    def run(folder):
        rc = main(["release", str(folder), "--repo-id", "me/x", "--dry-run", "--output-dir", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "\n" not in err and "Traceback" not in err
        return err

    no_weights = _broken_copy(checkpoint, tmp_path, "noweights")
    (no_weights / "model.safetensors").unlink()
    assert "no safetensors weights (*.safetensors) in" in run(no_weights)

    missing_code = _broken_copy(checkpoint, tmp_path, "missingcode")
    (missing_code / "mask_decoder_mllmseg.py").unlink()
    err = run(missing_code)
    assert "remote-code file mask_decoder_mllmseg.py (needed by modeling_mllmseg.py) is missing" in err

    missing_auto = _broken_copy(checkpoint, tmp_path, "missingauto")
    (missing_auto / "processing_mllmseg.py").unlink()
    assert "processing_mllmseg.py (needed by the auto_map of processor_config.json)" in run(missing_auto)

    pickled = _broken_copy(checkpoint, tmp_path, "pickled")
    (pickled / "training_args.bin").write_bytes(b"\x80\x04N.")
    assert "pickle file" in run(pickled) and "training_args.bin" in run(pickled)

    assert main(["release", str(checkpoint), "--repo-id", "x"]) == 2
    assert "--repo-id must be ORG/NAME" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_closure_lists_all_code(checkpoint):
    assert set(remote_code_closure(checkpoint)) == {n for n in REPO_ROOT_FILES if n.endswith(".py")}


class FakeHub:
    """Answers huggingface_hub's HTTP requests like the Hub would, and records them."""

    def __init__(self):
        self.requests = []

    def __call__(self, request):
        import httpx2

        path, body = request.url.path, request.content
        self.requests.append((request.method, path, dict(request.url.params), body))
        if path == "/api/repos/create":
            payload = json.loads(body)
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{payload['organization']}/{payload['name']}"})
        if path == "/api/validate-yaml":
            return httpx2.Response(200, json={})
        if "/preupload/" in path:
            files = json.loads(body)["files"]
            return httpx2.Response(200, json={"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]})
        if "/commit/" in path:
            return httpx2.Response(200, json={
                "commitUrl": "https://huggingface.co/me/tiny-mllmseg/commit/" + "a" * 40, "commitOid": "a" * 40,
                "pullRequestUrl": "https://huggingface.co/me/tiny-mllmseg/discussions/1"})
        return httpx2.Response(404, json={"error": f"unexpected {request.method} {path}"})


@pytest.fixture
def fake_hub(monkeypatch):
    import httpx2
    from huggingface_hub.utils import _http

    hub = FakeHub()
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
    original = _http._GLOBAL_CLIENT_FACTORY
    _http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub)))
    yield hub
    _http.set_client_factory(original)


def test_upload_is_one_commit(checkpoint, eval_json, tmp_path, fake_hub, capsys):
    out = tmp_path / "release"
    rc = main(["release", str(checkpoint), "--repo-id", "me/tiny-mllmseg", "--private", "--create-pr",
               "--output-dir", str(out), "--eval-json", str(eval_json), "--commit-message", "Release v1"])
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    assert "pull request: https://huggingface.co/me/tiny-mllmseg/discussions/1" in stdout
    calls = [(m, p) for m, p, _, _ in fake_hub.requests]
    assert ("POST", "/api/repos/create") in calls
    create = next(json.loads(b) for m, p, _, b in fake_hub.requests if p == "/api/repos/create")
    assert (create.get("visibility") == "private" or create.get("private") is True) and create["name"] == "tiny-mllmseg" and create["organization"] == "me"
    commits = [(params, body) for m, p, params, body in fake_hub.requests if "/commit/" in p]
    assert len(commits) == 1  # ONE commit
    params, body = commits[0]
    assert params.get("create_pr") == "1"
    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
    assert lines[0]["key"] == "header" and lines[0]["value"]["summary"] == "Release v1"
    files = {line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in lines[1:]}
    assert set(files) == REPO_ROOT_FILES
    assert files["model.safetensors"] == (checkpoint / "model.safetensors").read_bytes()
    assert b"model-index" in files["README.md"] and b"pipeline_tag: image-segmentation" in files["README.md"]
    assert all(not p.endswith((".bin", ".pt", ".pth", ".pkl")) for p in files)


def test_dry_run_uploads_nothing(dry_run, fake_hub, checkpoint, tmp_path):
    rc = main(["release", str(checkpoint), "--repo-id", "me/tiny-mllmseg", "--dry-run",
               "--output-dir", str(tmp_path / "r"), "--skip-verify"])
    assert rc == 0 and fake_hub.requests == []


def test_release_refuses_symlinks_and_files_outside_the_folder(checkpoint, tmp_path, capsys):
    """A symlinked file would upload its target; an index entry `../x.safetensors` escaped the folder."""
    def run(folder):
        rc = main(["release", str(folder), "--repo-id", "me/x", "--dry-run", "--output-dir", str(tmp_path / f"o-{folder.name}")])
        return rc, capsys.readouterr().err.strip()

    linked = _broken_copy(checkpoint, tmp_path, "linked")
    target = tmp_path / "elsewhere.py"
    (linked / "configuration_mllmseg.py").rename(target)
    (linked / "configuration_mllmseg.py").symlink_to(target)
    rc, err = run(linked)
    assert rc == 2 and "is a symbolic link" in err and "configuration_mllmseg.py" in err

    escaping = _broken_copy(checkpoint, tmp_path, "escaping")
    outside = tmp_path / "x.safetensors"
    (escaping / "model.safetensors").rename(outside)
    from safetensors import safe_open

    with safe_open(str(outside), "pt") as f:
        keys = list(f.keys())
    (escaping / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: "../x.safetensors" for k in keys}}))
    rc, err = run(escaping)
    assert rc == 2 and "resolves outside the checkpoint folder" in err
    assert not (tmp_path / "o-escaping").exists() or not any((tmp_path / "o-escaping").iterdir())

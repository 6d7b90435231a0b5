"""HF Trainer integration: NaN guard, atomic checkpoints, kill -9 + resume, two-process gloo run, LoRA merge, the
summary loss across resumes, failed saves (real refused writes) and the warmup warning."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from mllmseg.training.recipes import load_recipe
from mllmseg.training.trainer import NonFiniteLossError, build_trainer, run_training

REPO = Path(__file__).resolve().parents[1]
FAST = [
    "model.tiny.image_size=56", "model.tiny.vision_width=32", "model.tiny.text_width=32",
    "data.train.image_size=[56,56]", "training.per_device_train_batch_size=2", "training.logging_steps=1",
    "training.warmup_steps=0", "training.dataloader_num_workers=0",
]


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO))
    return env


def test_nan_loss_stops_training_naming_the_step(tmp_path):
    trainer, _, _ = build_trainer(load_recipe("tiny", FAST + ["training.max_steps=5", "training.save_strategy=no"]),
                                  output_dir=str(tmp_path))
    with torch.no_grad():
        trainer.model.lm_head.weight[3, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"at step 1\b"):
        trainer.train()


def test_kill_and_resume_keeps_step_and_optimizer_state(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mllmseg", "train", "tiny", "--output-dir", str(out), *FAST,
           "training.max_steps=400", "training.save_steps=3", "training.save_total_limit=2"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):  # wait up to ~120 s for the first checkpoint
            if any(out.glob("checkpoint-*")):
                break
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint appeared while waiting ~120 s")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # only complete checkpoints are visible (staged saves are renamed into place)
    steps = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    last = steps[-1]
    for s in steps:
        assert (out / f"checkpoint-{s}" / "trainer_state.json").is_file()
        assert (out / f"checkpoint-{s}" / "optimizer.pt").is_file()
    saved_opt = torch.load(out / f"checkpoint-{last}" / "optimizer.pt", weights_only=True)
    assert int(next(iter(saved_opt["state"].values()))["step"]) == last

    recipe = load_recipe("tiny", FAST + [f"training.max_steps={last + 2}", "training.save_steps=1000"])
    result = run_training(recipe, output_dir=str(out), resume=None)  # None: resumes because a checkpoint exists
    trainer = result["trainer"]
    assert trainer.state.global_step == last + 2
    history_steps = [h["step"] for h in trainer.state.log_history if "loss" in h]
    assert history_steps[-2:] == [last + 1, last + 2]  # continued, not restarted
    opt_steps = {int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert opt_steps == {last + 2}  # Adam moments were loaded (a fresh optimizer would be at 2)
    assert (out / "final" / "model.safetensors").is_file()


def test_two_process_gloo_training(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(
        "import json, os, sys, torch\n"
        "from transformers import TrainerCallback\n"
        "from mllmseg.training.recipes import load_recipe\n"
        "from mllmseg.training.trainer import run_training\n"
        "class Record(TrainerCallback):\n"
        "    losses = []\n"
        "    def on_log(self, args, state, control, logs=None, **kw):\n"
        "        if logs and 'loss' in logs: self.losses.append(float(logs['loss']))\n"
        "out, *overrides = sys.argv[1:]\n"
        "res = run_training(load_recipe('tiny', overrides), output_dir=out, callbacks=[Record()])\n"
        "tr = res['trainer']\n"
        "params = torch.cat([p.detach().flatten() for p in tr.model.parameters()])\n"
        "rank = int(os.environ.get('RANK', 0))\n"
        "json.dump({'world': tr.args.world_size, 'step': tr.state.global_step, 'losses': Record.losses,\n"
        "           'param_sum': float(params.double().sum()), 'param_abs': float(params.double().abs().sum()),\n"
        "           'backend': str(torch.distributed.get_backend()) if torch.distributed.is_initialized() else None},\n"
        "          open(os.path.join(out, f'rank{rank}.json'), 'w'))\n"
    )
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(script), str(out), *FAST, "training.max_steps=3", "training.save_steps=3"]
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=200)
    assert run.returncode == 0, run.stderr[-4000:]
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["backend"] == "gloo"
    assert r0["step"] == r1["step"] == 3
    assert len(r0["losses"]) == 3 and r0["losses"] == r1["losses"]
    assert r0["param_sum"] == r1["param_sum"] and r0["param_abs"] == r1["param_abs"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    assert not (out / ".staging").exists()
    assert {"rng_state_0.pth", "rng_state_1.pth", "model.safetensors"} <= {p.name for p in (out / "checkpoint-3").iterdir()}


def test_merge_lora_matches_adapter_model(tmp_path):
    from mllmseg.data.synthetic import SyntheticReferringDataset
    from mllmseg.remote_code.modeling_mllmseg import MLLMSegForConditionalGeneration
    from mllmseg.training.collator import MLLMSegCollator
    from mllmseg.training.dataset import ConversationDataset
    from mllmseg.training.merge import load_adapter_model

    recipe = load_recipe("tiny", FAST + ["training.max_steps=3", "training.save_strategy=no",
                                         "training.learning_rate=0.02", "lora={r: 4, alpha: 8, dropout: 0.0}"])
    result = run_training(recipe, output_dir=str(tmp_path / "lora"))
    adapter = tmp_path / "lora" / "final"
    assert (adapter / "adapter_model.safetensors").is_file()
    merged_dir = tmp_path / "merged"
    run = subprocess.run([sys.executable, "-m", "mllmseg", "merge-lora", str(adapter), str(merged_dir)],
                         env=_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert not any("lora" in n for n in json.loads((merged_dir / "config.json").read_text()))

    adapted = load_adapter_model(adapter)
    merged = MLLMSegForConditionalGeneration.from_pretrained(merged_dir).eval()
    processor = result["processor"]
    ds = ConversationDataset(SyntheticReferringDataset(2, seed=5, split="x", image_size=(56, 56)))
    batch = MLLMSegCollator(processor)([ds[0], ds[1]])
    with torch.no_grad():
        a, b = adapted(**batch), merged(**batch)
        base = MLLMSegForConditionalGeneration.from_pretrained(result["base_model"]).eval()(**batch)
    assert (a.logits - base.logits).abs().max() > 1e-3  # the adapter changed the model
    torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=0)
    for pa, pb in zip(a.pred_masks, b.pred_masks):
        torch.testing.assert_close(pb, pa, atol=1e-5, rtol=0)


def test_rotation_keeps_the_newest_complete_checkpoints(tmp_path):
    out = tmp_path / "rot"
    (out / ".staging" / "checkpoint-1.deleting").mkdir(parents=True)  # left by a kill during an earlier deletion
    recipe = load_recipe("tiny", FAST + ["training.max_steps=5", "training.save_steps=1", "training.save_total_limit=2"])
    result = run_training(recipe, output_dir=str(out), resume=False)
    assert result["global_step"] == 5
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]
    for name in ("checkpoint-4", "checkpoint-5"):
        assert (out / name / "trainer_state.json").is_file() and (out / name / "optimizer.pt").is_file()
    assert not (out / ".staging").exists()  # leftovers cleared, nothing half-written in sight
    assert not list((out / "final").glob("*.bin"))  # the final model folder carries no pickle


def test_finished_run_is_not_trained_again_and_stale_trash_goes(tmp_path, capsys):
    """Re-running a finished `mllmseg train` used to train one more step and rewrite final/."""
    from safetensors.torch import load_file

    recipe = load_recipe("tiny", FAST + ["training.max_steps=2", "training.save_steps=1", "training.save_total_limit=1"])
    out = tmp_path / "run"
    first = run_training(recipe, output_dir=str(out))
    weights = load_file(out / "final" / "model.safetensors")
    mtime = (out / "final" / "model.safetensors").stat().st_mtime_ns
    trash = out / ".staging" / "checkpoint-1.deleting"
    trash.mkdir(parents=True)
    (trash / "half.bin").write_bytes(b"x")
    again = run_training(recipe, output_dir=str(out))
    assert "already trained to step 2" in capsys.readouterr().out
    assert again["global_step"] == first["global_step"] == 2
    assert (out / "final" / "model.safetensors").stat().st_mtime_ns == mtime
    assert all(torch.equal(v, load_file(out / "final" / "model.safetensors")[k]) for k, v in weights.items())
    assert not trash.exists()


class _StopAfterSave(TrainerCallback):
    """Ends the run right after the checkpoint at `step` is written: an interruption at a checkpoint."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_summary_loss_covers_the_whole_run_across_resumes(tmp_path):
    """After a resume, train_summary.json's loss used to cover only the steps of the last process."""
    recipe = load_recipe("tiny", FAST + ["training.max_steps=7", "training.logging_steps=2", "training.save_steps=3"])
    whole = run_training(recipe, output_dir=str(tmp_path / "whole"))
    run_training(recipe, output_dir=str(tmp_path / "parts"), callbacks=[_StopAfterSave(3)])
    stopped = json.loads((tmp_path / "parts" / "train_summary.json").read_text())
    assert stopped["global_step"] == 3
    resumed = run_training(recipe, output_dir=str(tmp_path / "parts"))
    assert resumed["resumed_from"].endswith("checkpoint-3")
    one, two = (json.loads((tmp_path / name / "train_summary.json").read_text()) for name in ("whole", "parts"))
    assert one["global_step"] == two["global_step"] == 7
    assert one["loss_steps"] == two["loss_steps"] == 7  # every step's loss is in the mean, across both processes
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-6)
    assert two["last_loss"] == pytest.approx(one["last_loss"], rel=1e-6)
    # the uninterrupted summary equals the Trainer's own mean over all steps
    assert one["train_loss"] == pytest.approx(whole["trainer"].state.log_history[-1]["train_loss"], rel=1e-6)
    # and the resumed process alone saw a different mean (what the summary used to report)
    assert resumed["trainer"].state.log_history[-1]["train_loss"] != pytest.approx(one["train_loss"], rel=1e-3)


def _limit_file_size(limit):
    """preexec_fn: writes past `limit` bytes fail with EFBIG (a real failed write, as on a full disk); SIGXFSZ is
    ignored so the write returns the error instead of killing the process (CPython ignores it too)."""
    def apply():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("fails_in, reason", [
    ("model.safetensors", "File too large"),  # safetensors passes the errno on
    ("optimizer.pt", "inline_container.cc"),  # torch.save's zip writer does not: the issue's `[enforce fail at ...]`
])
def test_failed_save_is_one_line_and_the_last_checkpoint_resumes(tmp_path, fails_in, reason):
    """A full disk during a save used to end in torch's `RuntimeError: [enforce fail at inline_container.cc...]`
    traceback (or safetensors' error). RLIMIT_FSIZE makes the kernel refuse the write the way a full disk does (the
    same `write` failing with an errno, through the same safetensors / torch.save code), without needing root for a
    small filesystem. The limit sits below the file named by `fails_in` and above every file written before it."""
    import hashlib

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mllmseg", "train", "tiny", "--output-dir", str(out), *FAST,
           "training.disable_tqdm=true", "training.save_steps=2"]
    first = subprocess.run(cmd + ["training.max_steps=2"], env=_env(), capture_output=True, text=True, timeout=200)
    assert first.returncode == 0, first.stderr[-3000:]
    sizes = {p.name: p.stat().st_size for p in (out / "checkpoint-2").iterdir()}
    digest = {name: hashlib.sha256((out / "checkpoint-2" / name).read_bytes()).hexdigest() for name in sizes}
    model, optimizer = sizes["model.safetensors"], sizes["optimizer.pt"]
    assert max(s for n, s in sizes.items() if n not in ("model.safetensors", "optimizer.pt")) < model // 2
    limit = model // 2 if fails_in == "model.safetensors" else (model + optimizer) // 2

    failed = subprocess.run(cmd + ["training.max_steps=4"], env=_env(), capture_output=True, text=True, timeout=200,
                            preexec_fn=_limit_file_size(limit))
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr
    errors = [line for line in failed.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0] == failed.stderr.splitlines()[-1], failed.stderr[-3000:]
    line = errors[0]
    assert line.startswith("mllmseg train: error: could not save checkpoint-4")
    assert str(out) in line and "free space" in line and reason in line
    assert str(out / "checkpoint-2") in line
    # the last complete checkpoint is untouched, nothing half-written is in sight
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert {n: hashlib.sha256((out / "checkpoint-2" / n).read_bytes()).hexdigest() for n in sizes} == digest
    assert not (out / ".staging").exists()

    again = subprocess.run(cmd + ["training.max_steps=4"], env=_env(), capture_output=True, text=True, timeout=200)
    assert again.returncode == 0, again.stderr[-3000:]
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4]
    assert json.loads((out / "train_summary.json").read_text())["resumed_from"] == str(out / "checkpoint-2")


def test_warmup_longer_than_the_run_is_one_warning(tmp_path, caplog):
    caplog.set_level("WARNING", logger="mllmseg.training.trainer")
    build_trainer(load_recipe("tiny", FAST + ["training.max_steps=20", "training.warmup_steps=50",
                                              "training.save_strategy=no"]), output_dir=str(tmp_path / "a"))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "warmup" in warnings[0] and "50" in warnings[0] and "20" in warnings[0]
    caplog.clear()
    build_trainer(load_recipe("tiny", FAST + ["training.max_steps=20", "training.warmup_steps=5",
                                              "training.save_strategy=no"]), output_dir=str(tmp_path / "b"))
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_fsdp_on_cpu_processes_is_refused_not_silently_ddp(tmp_path):
    """accelerate enables FSDP only on accelerators: two gloo CPU processes asked for FSDP trained plain DDP (every
    process holding the whole model) without a word. Now each process stops with one line saying so, before training."""
    out = tmp_path / "fsdp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
           "-m", "mllmseg", "train", "tiny", "--output-dir", str(out), *FAST, "training.max_steps=2",
           "training.fsdp=true"]
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=200)
    assert run.returncode != 0
    # Each process that gets there says so; torchrun may stop the other first, and their stderr can interleave.
    prefix = "mllmseg train: error: FSDP was requested"
    assert prefix in run.stderr, run.stderr[-3000:]
    message = run.stderr[run.stderr.index(prefix):].split(prefix)[1]
    assert "multi_cpu with 2 process(es)" in message.lower() and "silently train plain DDP" in message
    assert not (out / "final").exists() and not list(out.glob("checkpoint-*"))


def test_train_dataset_from_python_replaces_the_recipe_data(tmp_path):
    """run_training(recipe, train_dataset=...) trains on the user's own samples (here rows of image + expression +
    mask through ReferringRowsDataset) and the summary says so instead of the recipe's synthetic source."""
    import numpy as np
    from PIL import Image

    from mllmseg.data.rows import ReferringRowsDataset

    rows = []
    for i in range(4):
        image = np.zeros((56, 56, 3), np.uint8)
        image[10 + i : 30 + i, 12:40] = (220, 30, 30)
        mask = np.zeros((56, 56), np.uint8)
        mask[10 + i : 30 + i, 12:40] = 1
        rows.append({"image": Image.fromarray(image), "expression": "the red box", "mask": mask, "image_id": f"r{i}"})
    recipe = load_recipe("tiny", FAST + ["training.max_steps=2", "training.save_strategy=no"])
    seen = []

    class Recording(ReferringRowsDataset):
        def __getitem__(self, index):
            seen.append(index)
            return super().__getitem__(index)

    data = Recording(rows)
    result = run_training(recipe, output_dir=str(tmp_path / "run"), train_dataset=data)
    assert result["global_step"] == 2 and seen  # the user's samples were read
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["recipe"]["data"]["train"] == [
        {"type": "python", "description": "Recording of 4 samples passed as run_training(train_dataset=...)"}]
    with pytest.raises(TypeError, match=r"train_dataset\[0\] must be a ReferringSample, got dict"):
        build_trainer(recipe, output_dir=str(tmp_path / "bad"), train_dataset=rows)

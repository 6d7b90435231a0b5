"""The from-scratch quickstart (`--from-scratch`) keeps checkpoints: a run that was stopped resumes from its last
checkpoint, a finished one is not trained again, and its overlays show the ground truth beside the prediction."""
import types

from PIL import Image

from mllmseg.commands import quickstart

FAST = ["model.tiny.image_size=56", "model.tiny.vision_width=32", "model.tiny.text_width=32",
        "data.train.image_size=[56,56]", "training.per_device_train_batch_size=2", "training.logging_steps=1",
        "training.warmup_steps=0", "training.save_steps=2"]


def _args(out, steps):
    return types.SimpleNamespace(output_dir=str(out), seed=0, steps=steps, eval_images=2, overlays=1, overrides=FAST,
                                 from_scratch=True)


def test_quickstart_resumes_and_does_not_retrain(tmp_path, capsys):
    out = tmp_path / "qs"
    assert quickstart.run(_args(out, 2)) == 0  # stands for a run stopped after its checkpoint at step 2
    assert (out / "run" / "checkpoint-2" / "trainer_state.json").is_file()
    capsys.readouterr()
    assert quickstart.run(_args(out, 4)) == 0  # the same command with the full budget: continues at step 2
    printed = capsys.readouterr().out
    assert "trained 4 steps" in printed
    import json

    state = json.loads((out / "run" / "checkpoint-4" / "trainer_state.json").read_text())
    logged = [h["step"] for h in state["log_history"] if "loss" in h]
    assert logged[-2:] == [3, 4] and 1 not in logged[logged.index(3):]  # resumed, not restarted
    assert quickstart.run(_args(out, 4)) == 0
    assert "already trained to step 4" in capsys.readouterr().out
    panel = Image.open(out / "overlays" / "heldout_0.png")
    assert panel.width == 2 * 56 + 4  # ground truth | prediction

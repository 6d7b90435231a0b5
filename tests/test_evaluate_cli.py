"""`mllmseg evaluate` end to end on a tiny remote-code checkpoint: real subprocesses, real data-parallel CPU run
(torchrun, two processes, gloo) against a single-process run, and the refer layout on the RefCOCOg mini fixture."""
import json
import os
import pickle
import shutil
import subprocess
import sys
from collections import Counter

import pytest
from PIL import Image

from mllmseg.cli import main

COCO_NAME = "images/mscoco/images/train2014/COCO_train2014_{:012d}.jpg"
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from mllmseg.tiny import build_processor, build_tiny_model

    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    model, tokenizer = build_tiny_model(seed=0)
    model.save_pretrained(folder)
    build_processor(tokenizer, model.config).save_pretrained(folder)
    return folder


def _evaluate(launcher, checkpoint, out, *extra):
    cmd = launcher + ["-m", "mllmseg", "evaluate", str(checkpoint), "--output-dir", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=out.parent)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _read(out, stem):
    results = json.loads((out / f"{stem}.json").read_text())
    predictions = [json.loads(line) for line in (out / f"{stem}_predictions.jsonl").read_text().splitlines()]
    return results, predictions


def test_two_processes_match_one(checkpoint, tmp_path):
    args = ["--dataset", "synthetic", "--num-images", "4", "--batch-size", "2", "--predictions", "--seed", "0"]
    single, double = tmp_path / "single", tmp_path / "double"
    _evaluate([sys.executable], checkpoint, single, *args, "--num-workers", "1")  # batches built in a worker process
    proc = _evaluate([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
                     checkpoint, double, *args)
    assert proc.stdout.count("results: ") == 1  # only the main process writes and reports
    one, preds_one = _read(single, "synthetic_validation_fast")
    two, preds_two = _read(double, "synthetic_validation_fast")
    assert one["num_processes"] == 1 and two["num_processes"] == 2
    m1, m2 = one["metrics"], two["metrics"]
    assert m1["n_expressions"] == len(preds_one) > 4 and m1["n_images"] == 4
    for key in ("I_sum", "U_sum", "n_expressions", "n_images", "n_rec", "n_no_target", "n_targeted"):
        assert m1[key] == m2[key], key
    for key in ("cIoU", "gIoU_per_expression", "gIoU_per_image", "prec@0.5", "N-acc", "T-acc"):
        assert (m1[key] is None and m2[key] is None) or m1[key] == pytest.approx(m2[key], rel=1e-9, abs=1e-12), key
    assert [(p["image_id"], p["expression"], p["rejected"], p["rle"]) for p in preds_one] == \
           [(p["image_id"], p["expression"], p["rejected"], p["rle"]) for p in preds_two]
    assert [p["score"] for p in preds_one] == pytest.approx([p["score"] for p in preds_two], abs=1e-5)
    table = (double / "synthetic_validation_fast.md").read_text()
    assert "gIoU (mean over expressions, LISA)" in table and "gIoU (mean over images, MLLMSeg ref.)" in table

    # Per expression category (the synthetic set labels its referents): the categories the dataset drew, the same
    # with one process or two, and adding up to the totals.
    from mllmseg.data.synthetic import SyntheticReferringDataset
    from mllmseg.training.recipes import synthetic_scene_kwargs

    drawn = SyntheticReferringDataset(4, seed=0, split="validation", **synthetic_scene_kwargs("tiny"))
    expected = Counter(r.category for i in range(len(drawn)) for r in drawn[i].referents)
    c1, c2 = one["metrics_by_category"], two["metrics_by_category"]
    assert {name: m["n_expressions"] for name, m in c1.items()} == dict(expected)
    assert c1.keys() == c2.keys()
    for name in c1:
        for key in ("I_sum", "U_sum", "n_expressions", "n_rec", "n_no_target"):
            assert c1[name][key] == c2[name][key], (name, key)
    for key in ("I_sum", "U_sum", "n_expressions", "n_rec", "n_no_target"):
        assert sum(m[key] for m in c1.values()) == m1[key], key
    assert all((m["n_no_target"] > 0) == (name == "no_target") for name, m in c1.items())
    assert "By expression category" in (single / "synthetic_validation_fast.md").read_text()


def test_refer_layout_refcocog(checkpoint, fixtures_dir, tmp_path):
    mini = fixtures_dir / "refcocog_umd_mini"
    data_root, image_root = tmp_path / "data", tmp_path / "images"
    (data_root / "refcocog").mkdir(parents=True)
    for name in ("refs(umd).p", "instances.json"):
        shutil.copy(mini / name, data_root / "refcocog" / name)
    instances = json.loads((mini / "instances.json").read_text())
    sizes = {}
    for info in instances["images"]:
        path = image_root / COCO_NAME.format(info["id"])
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (info["width"], info["height"]), (128, 128, 128)).save(path)
        sizes[info["id"]] = [info["height"], info["width"]]
    with open(mini / "refs(umd).p", "rb") as f:
        refs = pickle.load(f)
    val = [r for r in refs if r["split"] == "val"]

    out = tmp_path / "out"
    _evaluate([sys.executable], checkpoint, out, "--dataset", "refcocog", "--data-root", str(data_root),
              "--image-root", str(image_root), "--split", "val", "--predictions", "--batch-size", "4")
    results, predictions = _read(out, "refcocog_val_fast")
    assert results["dataset"] == "refcocog" and results["split"] == "val"
    metrics = results["metrics"]
    assert metrics["n_expressions"] == sum(len(r["sentences"]) for r in val) == len(predictions)
    assert metrics["n_images"] == len({r["image_id"] for r in val})
    assert metrics["n_rec"] == metrics["n_expressions"]  # every RefCOCOg ref has a box
    assert 0.0 <= metrics["cIoU"] <= 1.0 and metrics["N-acc"] is None
    per_image = Counter(p["image_id"] for p in predictions)
    expected = Counter()
    for ref in val:
        expected[ref["image_id"]] += len(ref["sentences"])
    assert per_image == expected
    for p in predictions:
        assert p["rle"]["size"] == sizes[p["image_id"]]  # masks at the original resolution
        assert p["ref_id"] in {r["ref_id"] for r in val}


def test_user_errors_are_one_line(checkpoint, tmp_path, capsys):
    assert main(["evaluate", str(checkpoint), "--dataset", "synthetic", "--num-workers", "-1"]) == 2
    assert "--num-workers must be >= 0, got -1" in capsys.readouterr().err
    assert main(["evaluate", str(checkpoint), "--dataset", "refcoco"]) == 2
    assert "--data-root is required" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing"), "--dataset", "synthetic"]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert main(["evaluate", str(checkpoint), "--dataset", "refcocog", "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "dataset folder not found" in err and "\n" not in err

"""Bad annotation records: errors that name the file, the record and the field; `on_bad_record="skip"` drops exactly
the bad records, counts them, and training / evaluation report the count (never an empty mask in place of a bad one).

Built on the real RefCOCOg mini fixture (tests/fixtures/refcocog_umd_mini), edited record by record. Each image of
the fixture has exactly one ref, so dropping an image drops one ref.
"""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mllmseg.data.hub_refcoco import HubRefCOCODataset
from mllmseg.data.records import BadRecordError
from mllmseg.data.refer import ReferDataset

COCO_NAME = "images/mscoco/images/train2014/COCO_train2014_{:012d}.jpg"
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def _copy(value):
    return json.loads(json.dumps(value))


def _write(root, refs, instances, images=False):
    """A refer layout under root/refcocog (refs as JSON), with blank images when asked."""
    (root / "refcocog").mkdir(parents=True, exist_ok=True)
    (root / "refcocog" / "refs(umd).json").write_text(json.dumps(refs))
    (root / "refcocog" / "instances.json").write_text(json.dumps(instances))
    if images:
        for info in instances["images"]:
            if {"id", "width", "height"} <= set(info):
                path = root / COCO_NAME.format(info["id"])
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (info["width"], info["height"]), (128, 128, 128)).save(path)
    return root


def _ann(instances, ann_id):
    return next(a for a in instances["annotations"] if a["id"] == ann_id)


def _image(instances, image_id):
    return next(i for i in instances["images"] if i["id"] == image_id)


# ---------------------------------------------------------------------------------------------- named errors


@pytest.mark.parametrize("field", ["height", "width"])
def test_image_without_size_names_file_ref_and_field(tmp_path, mini, field):
    """Used to be a bare `KeyError: 'height'` when the sample was built."""
    instances = _copy(mini["instances"])
    ref = mini["refs"][3]
    del _image(instances, ref["image_id"])[field]
    root = _write(tmp_path, mini["refs"], instances)
    with pytest.raises(BadRecordError) as err:
        ReferDataset(root, "refcocog")
    message = str(err.value)
    assert str(root / "refcocog" / "instances.json") in message
    assert f"image_id {ref['image_id']}" in message and repr(field) in message
    assert f"ref_id {ref['ref_id']}" in message


def test_image_and_annotation_without_id_name_their_position(tmp_path, mini):
    instances = _copy(mini["instances"])
    del instances["images"][4]["id"]
    root = _write(tmp_path / "a", mini["refs"], instances)
    with pytest.raises(BadRecordError, match=r"instances\.json: image at position 4 has no 'id'"):
        ReferDataset(root, "refcocog")

    instances = _copy(mini["instances"])
    del instances["annotations"][7]["id"]
    root = _write(tmp_path / "b", mini["refs"], instances)
    with pytest.raises(BadRecordError, match=r"instances\.json: annotation at position 7 \(image_id \d+\) has no 'id'"):
        ReferDataset(root, "refcocog")


def test_bbox_of_strings_names_the_annotation(tmp_path, mini):
    """Used to be numpy's bare "could not convert string to float" when the sample was built."""
    instances = _copy(mini["instances"])
    ref = mini["refs"][0]
    _ann(instances, ref["ann_id"])["bbox"] = ["12.5", "x", 3, 4]
    root = _write(tmp_path, mini["refs"], instances)
    with pytest.raises(BadRecordError) as err:
        ReferDataset(root, "refcocog")
    message = str(err.value)
    assert f"ref_id {ref['ref_id']}" in message and f"ann_id {ref['ann_id']}" in message and "'bbox'" in message
    assert "refcocog" in message and "'x'" in message


def test_bad_polygon_is_found_when_the_dataset_is_built(tmp_path, mini):
    """Odd polygons used to become empty masks; now the loader stops before any sample is built, naming the field."""
    instances = _copy(mini["instances"])
    ref = mini["refs"][2]
    _ann(instances, ref["ann_id"])["segmentation"] = [[10, 10, 20, 10, 20]]
    root = _write(tmp_path, mini["refs"], instances)
    with pytest.raises(BadRecordError) as err:
        ReferDataset(root, "refcocog")
    message = str(err.value)
    assert message.startswith(str(root / "refcocog"))
    assert f"ref_id {ref['ref_id']}" in message and f"ann_id {ref['ann_id']}" in message
    assert "'segmentation'" in message and "5 values" in message


def test_json_syntax_errors_name_file_line_and_column(tmp_path, mini):
    root = _write(tmp_path / "a", mini["refs"], mini["instances"])
    text = (root / "refcocog" / "instances.json").read_text()
    (root / "refcocog" / "instances.json").write_text(text[:300])
    with pytest.raises(ValueError, match=r"instances\.json: not valid JSON: .*line 1 column \d+"):
        ReferDataset(root, "refcocog")
    root = _write(tmp_path / "b", mini["refs"], mini["instances"])
    (root / "refcocog" / "refs(umd).json").write_text('[{"ref_id": 1,\n "split": ')
    with pytest.raises(ValueError, match=r"refs\(umd\)\.json: not valid JSON: .*line 2 column 11"):
        ReferDataset(root, "refcocog")


def test_truncated_image_file_is_named_when_read(tmp_path, mini):
    """A cut JPEG used to load lazily and fail later, deep in preprocessing, as Pillow's unnamed "image file is
    truncated" / "Truncated File Read"."""
    root = _write(tmp_path, mini["refs"], mini["instances"], images=True)
    ds = ReferDataset(root, "refcocog")
    sample = ds[0]
    path = root / COCO_NAME.format(sample.image_id)
    noise = (np.random.default_rng(0).random((sample.height, sample.width, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(OSError) as err:
        ds[0].image
    assert str(path) in str(err.value) and "truncated" in str(err.value)


# ---------------------------------------------------------------------------------------------- skipping


def test_skip_drops_exactly_the_bad_records_and_counts_them(tmp_path, mini):
    instances = _copy(mini["instances"])
    refs = _copy(mini["refs"])
    bad_polygon, no_height, bad_bbox = refs[0], refs[5], refs[9]
    _ann(instances, bad_polygon["ann_id"])["segmentation"] = [[1, 2, 3, float("nan"), 5, 6]]
    del _image(instances, no_height["image_id"])["height"]
    _ann(instances, bad_bbox["ann_id"])["bbox"] = [1, 2, 3]
    orphan = _copy(instances["annotations"][0])
    del orphan["id"]
    instances["annotations"].append(orphan)  # an annotation record no ref can use
    root = _write(tmp_path, refs, instances, images=True)

    with pytest.raises(BadRecordError):
        ReferDataset(root, "refcocog")  # the default stops at the first bad record
    with pytest.raises(ValueError, match="on_bad_record must be 'error' or 'skip'"):
        ReferDataset(root, "refcocog", on_bad_record="ignore")
    ds = ReferDataset(root, "refcocog", on_bad_record="skip")
    assert len(ds.skipped) == 4
    assert [("annotation at position 108" in s) for s in ds.skipped].count(True) == 1
    for ref in (bad_polygon, no_height, bad_bbox):
        assert sum(f"ref_id {ref['ref_id']}:" in s for s in ds.skipped) == 1
    bad_ids = {bad_polygon["ref_id"], no_height["ref_id"], bad_bbox["ref_id"]}
    assert len(ds) == 12 and ds.num_referents == sum(len(r["sentences"]) for r in refs if r["ref_id"] not in bad_ids)
    for sample in ds:  # what is left is intact: the masks pycocotools gives, never an empty stand-in
        for referent in sample.referents:
            assert referent.ref_id not in bad_ids
            assert int(referent.mask.sum()) == mini["verification"][referent.ref_id]["mask_area_px"] > 0
    # a split without bad records skips nothing
    assert ReferDataset(root, "refcocog", split="val", on_bad_record="skip").skipped == [
        s for s in ds.skipped if "annotation at position" in s]


def _hub_rows(mini):
    images = {i["id"]: i for i in mini["instances"]["images"]}
    anns = {a["id"]: a for a in mini["instances"]["annotations"]}
    return [{"ref_id": r["ref_id"], "ann_id": r["ann_id"], "image_id": r["image_id"], "split": r["split"],
             "sentences": r["sentences"], "raw_anns": json.dumps(anns[r["ann_id"]]),
             "raw_image_info": json.dumps(images[r["image_id"]]),
             "image_path": COCO_NAME.format(r["image_id"])} for r in mini["refs"]]


def test_hub_rows_are_checked_up_front_and_can_be_skipped(mini):
    import datasets

    rows = _hub_rows(mini)
    info = json.loads(rows[2]["raw_image_info"])
    del info["height"]
    rows[2]["raw_image_info"] = json.dumps(info)
    rows[6]["raw_anns"] = rows[6]["raw_anns"][:40]
    ann = json.loads(rows[11]["raw_anns"])
    ann["segmentation"] = [[1e9, 1e9, 5, 5, 3, 9]]
    rows[11]["raw_anns"] = json.dumps(ann)
    hub = datasets.Dataset.from_list(rows)

    with pytest.raises(BadRecordError) as err:
        HubRefCOCODataset(hub, source="my/refcoco")  # rows are checked before image files
    assert str(err.value).startswith(f"my/refcoco: row 2 (ref_id {rows[2]['ref_id']}): raw_image_info: ")
    assert "'height'" in str(err.value)
    ds = HubRefCOCODataset(hub, source="my/refcoco", on_bad_record="skip", check_images=False)
    assert len(ds) == 12 and len(ds.skipped) == 3
    assert "row 6" in ds.skipped[1] and "raw_anns" in ds.skipped[1] and "not valid JSON" in ds.skipped[1]
    assert "row 11" in ds.skipped[2] and "segmentation" in ds.skipped[2] and "far outside" in ds.skipped[2]
    kept = {r.ref_id for s in ds for r in s.referents}
    assert kept == {r["ref_id"] for r in rows} - {rows[i]["ref_id"] for i in (2, 6, 11)}


# ---------------------------------------------------------------------------------------------- training / evaluation


FAST = [
    "model.tiny.image_size=56", "model.tiny.vision_width=32", "model.tiny.text_width=32",
    "training.per_device_train_batch_size=2", "training.logging_steps=1", "training.warmup_steps=0",
    "training.save_strategy=no", "training.max_steps=1",
]


def _bad_layout(tmp_path, mini):
    instances = _copy(mini["instances"])
    for ref in (mini["refs"][0], mini["refs"][1]):  # two train refs
        _ann(instances, ref["ann_id"])["segmentation"] = [[1, 2, 3, 4]]
    return _write(tmp_path / "data", mini["refs"], instances, images=True)


def test_training_skips_bad_records_only_when_asked_and_reports_the_count(tmp_path, mini, caplog):
    from mllmseg.training.recipes import load_recipe
    from mllmseg.training.trainer import run_training

    root = _bad_layout(tmp_path, mini)
    source = f"data.train={{type: refer, data_root: {root}, dataset: refcocog, split: train}}"
    with pytest.raises(BadRecordError, match=rf"ref_id {mini['refs'][0]['ref_id']}.*'segmentation'"):
        run_training(load_recipe("tiny", FAST + [source]), output_dir=str(tmp_path / "stop"))
    assert not (tmp_path / "stop" / "train_summary.json").exists()

    caplog.set_level("WARNING", logger="mllmseg.training.trainer")
    result = run_training(load_recipe("tiny", FAST + [source, "data.on_bad_record=skip"]),
                          output_dir=str(tmp_path / "skip"))
    assert result["global_step"] == 1
    summary = json.loads((tmp_path / "skip" / "train_summary.json").read_text())
    assert summary["skipped_records"] == 2 and len(summary["skipped_examples"]) == 2
    assert all("'segmentation'" in s for s in summary["skipped_examples"])
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == 1 and "2 bad records" in lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from mllmseg.tiny import build_processor, build_tiny_model

    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    model, tokenizer = build_tiny_model(seed=0, image_size=56, vision_width=32, text_width=32)
    model.save_pretrained(folder)
    build_processor(tokenizer, model.config).save_pretrained(folder)
    return folder


def test_evaluate_cli_stops_or_skips_bad_records(checkpoint, tmp_path, mini):
    root = _bad_layout(tmp_path, mini)
    base = [sys.executable, "-m", "mllmseg", "evaluate", str(checkpoint), "--dataset", "refcocog",
            "--data-root", str(root), "--split", "train", "--output-dir", str(tmp_path / "out")]
    stop = subprocess.run(base, capture_output=True, text=True, timeout=300, env=ENV)
    assert stop.returncode == 2
    assert stop.stderr.count("\n") == 1 and stop.stderr.startswith("mllmseg evaluate: error: ")
    assert "refs(umd).json" in stop.stderr and f"ref_id {mini['refs'][0]['ref_id']}" in stop.stderr
    assert "'segmentation'" in stop.stderr

    skip = subprocess.run(base + ["--skip-bad-records"], capture_output=True, text=True, timeout=300, env=ENV)
    assert skip.returncode == 0, skip.stderr[-3000:]
    assert "skipped 2 bad records" in skip.stdout + skip.stderr
    results = json.loads((tmp_path / "out" / "refcocog_train_fast.json").read_text())
    assert results["skipped_records"] == 2 and len(results["skipped_examples"]) == 2
    train = [r for r in mini["refs"] if r["split"] == "train"]
    assert results["metrics"]["n_expressions"] == sum(len(r["sentences"]) for r in train[2:])

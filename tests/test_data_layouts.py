"""Image layouts: the refer / gRefCOCO loaders and the Hub adapter check, when they are built, that every image file
their split uses exists, and say how many are missing, which, under which root and in which layout, and, when a common
other layout nearby holds them, which options would find them. `mllmseg evaluate` and `mllmseg train` say so before
building a model.

Built on the real RefCOCOg mini fixture (tests/fixtures/refcocog_umd_mini; each of its 15 images has one ref), with
blank image files of the recorded sizes written in the layout under test.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from mllmseg.data.hub_refcoco import HubRefCOCODataset
from mllmseg.data.records import skipped_records
from mllmseg.data.refer import GRefCOCODataset, ReferDataset

COCO_FILE = "COCO_train2014_{:012d}.jpg"
REFER_TREE = "images/mscoco/images/train2014"  # the reference's image tree, under the image root
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def _annotations(data_root, mini, dataset="refcocog"):
    """``<data_root>/<dataset>/refs(umd).p`` and ``instances.json`` copied from the fixture."""
    (data_root / dataset).mkdir(parents=True)
    for name in ("refs(umd).p", "instances.json"):
        shutil.copy(mini["folder"] / name, data_root / dataset / name)
    return data_root


def _images(folder, mini, leave_out=(), name=COCO_FILE):
    """A blank image of the recorded size for every fixture image but ``leave_out``, named ``name.format(id)``."""
    folder.mkdir(parents=True, exist_ok=True)
    for info in mini["instances"]["images"]:
        if info["id"] not in leave_out:
            Image.new("L", (info["width"], info["height"]), 128).save(folder / name.format(info["id"]))


def _image_ids(mini, split):
    """Image ids of the refs of ``split``, in the loaders' order (first appearance in the refs file)."""
    return list(dict.fromkeys(r["image_id"] for r in mini["refs"] if split is None or r["split"] == split))


# ---------------------------------------------------------------------------------------------- refer loaders


def test_plain_coco_layout_is_found_and_named_with_the_options_that_read_it(tmp_path, mini):
    """The issue's case: images unpacked the COCO way (<root>/train2014/COCO_train2014_*.jpg), not in the reference's
    <root>/images/mscoco/images/train2014/ tree."""
    data_root = _annotations(tmp_path / "refer", mini)
    coco = tmp_path / "coco"
    _images(coco / "train2014", mini)
    val = _image_ids(mini, "val")
    with pytest.raises(FileNotFoundError) as err:
        ReferDataset(data_root, "refcocog", split="val", image_root=coco)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"refcocog refs(umd).p split val: {len(val)} of {len(val)} image files not found under "
                              f"image_root {coco}, laid out as {coco}/{REFER_TREE}/COCO_train2014_{{image_id:012d}}.jpg;")
    assert f"missing: {', '.join(str(coco / REFER_TREE / COCO_FILE.format(i)) for i in val[:3])}, ..." in message
    template = "train2014/COCO_train2014_{image_id:012d}.jpg"
    assert message.endswith(f"found them as {coco / 'train2014' / COCO_FILE.format(val[0])}: pass image_root {coco} "
                            f"(--image-root) and image_template {template!r} (--image-template)")

    ds = ReferDataset(data_root, "refcocog", split="val", image_root=coco, image_template=template)  # as suggested
    assert len(ds) == len(val)
    sample = ds[0]
    assert sample.image.size == (sample.width, sample.height)


@pytest.mark.parametrize("passed", ["images", "parent"])
def test_an_image_root_one_folder_off_is_corrected(tmp_path, mini, passed):
    """The reference's tree under the data root, but image_root names its images/ folder, or the folder above."""
    data_root = _annotations(tmp_path / "refer", mini)
    _images(data_root / REFER_TREE, mini)
    wrong = data_root / "images" if passed == "images" else tmp_path
    with pytest.raises(FileNotFoundError) as err:
        ReferDataset(data_root, "refcocog", image_root=wrong)
    assert "15 of 15 image files not found" in str(err.value)
    assert str(err.value).endswith(f"found them under {data_root}: pass image_root {data_root} (--image-root)")
    assert len(ReferDataset(data_root, "refcocog", image_root=data_root)) == 15
    assert len(ReferDataset(data_root, "refcocog")) == 15  # image_root defaults to data_root


def test_a_few_missing_images_are_counted_named_and_skippable(tmp_path, mini):
    from mllmseg.training.trainer import build_samples

    data_root = _annotations(tmp_path, mini)
    ids = _image_ids(mini, None)
    gone = [ids[4], ids[11]]
    _images(data_root / REFER_TREE, mini, leave_out=gone)
    with pytest.raises(FileNotFoundError) as err:
        ReferDataset(data_root, "refcocog")
    message = str(err.value)
    assert f"2 of 15 image files not found under image_root {data_root}" in message
    assert f"missing: {data_root / REFER_TREE / COCO_FILE.format(gone[0])}, " \
           f"{data_root / REFER_TREE / COCO_FILE.format(gone[1])} (" in message
    assert "found them" not in message and "--skip-bad-records" in message  # the layout is right: nothing to move

    ds = ReferDataset(data_root, "refcocog", on_bad_record="skip")
    gone_refs = [r for r in mini["refs"] if r["image_id"] in gone]
    assert len(ds) == 13 and len(ds.skipped) == len(gone_refs) == 2
    for note, ref in zip(ds.skipped, gone_refs):
        assert note.startswith(f"{data_root / 'refcocog' / 'refs(umd).p'}: ref_id {ref['ref_id']}: image file not "
                               f"found: {data_root / REFER_TREE / COCO_FILE.format(ref['image_id'])}")
    assert "2 of 15 image files not found" in ds.skipped[0] and "of 15" not in ds.skipped[1]  # the summary once
    assert {s.image_id for s in ds} == set(ids) - set(gone)
    for sample in ds:  # what is left is intact
        for referent in sample.referents:
            assert int(referent.mask.sum()) == mini["verification"][referent.ref_id]["mask_area_px"]
    # Training counts them as it counts other bad records (data.on_bad_record: skip).
    samples = build_samples([{"type": "refer", "data_root": str(data_root), "dataset": "refcocog"}], "skip")
    assert len(samples) == 13 and skipped_records(samples) == ds.skipped
    # A split whose images are all there skips nothing.
    clean = sorted({r["split"] for r in mini["refs"]} - {r["split"] for r in gone_refs})
    assert clean and ReferDataset(data_root, "refcocog", split=clean[0], on_bad_record="skip").skipped == []


def test_grefcoco_images_are_checked_too(tmp_path, mini, fixtures_dir):
    (tmp_path / "grefcoco").mkdir()
    for name in ("grefs(unc).json", "instances.json"):
        shutil.copy(fixtures_dir / "grefcoco_constructed" / name, tmp_path / "grefcoco" / name)
    grefs = json.loads((tmp_path / "grefcoco" / "grefs(unc).json").read_text())
    val = {r["image_id"] for r in grefs if r["split"] == "val"}
    with pytest.raises(FileNotFoundError, match=rf"grefcoco grefs\(unc\)\.json split val: {len(val)} of {len(val)} "
                                                "image files not found"):
        GRefCOCODataset(tmp_path, split="val")
    _images(tmp_path / REFER_TREE, mini)
    assert len(GRefCOCODataset(tmp_path, split="val")) == len(val)


def test_refclef_file_name_layout(tmp_path, mini):
    """RefCLEF images are named by instances.json's file_name under images/saiapr_tc-12/; a plain saiapr_tc-12/ next
    to the data is found and the template to read it is given."""
    (tmp_path / "refclef").mkdir()
    (tmp_path / "refclef" / "refs(unc).json").write_text(json.dumps(mini["refs"]))
    instances = json.loads(json.dumps(mini["instances"]))
    for info in instances["images"]:
        info["file_name"] = f"{info['id'] % 100:02d}/images/{info['id']}.jpg"  # saiapr_tc-12 names: <dir>/images/<id>
    (tmp_path / "refclef" / "instances.json").write_text(json.dumps(instances))
    for info in instances["images"]:
        path = tmp_path / "saiapr_tc-12" / info["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (info["width"], info["height"])).save(path)
    first = _image_ids(mini, "val")[0]
    with pytest.raises(FileNotFoundError) as err:
        ReferDataset(tmp_path, "refclef", split="val")
    message = str(err.value)
    assert f"laid out as {tmp_path}/images/saiapr_tc-12/{{file_name}};" in message
    assert message.endswith(f"found them as {tmp_path / 'saiapr_tc-12' / f'{first % 100:02d}/images/{first}.jpg'}: "
                            f"pass image_root {tmp_path} (--image-root) and image_template 'saiapr_tc-12/{{file_name}}' "
                            "(--image-template)")
    assert len(ReferDataset(tmp_path, "refclef", split="val", image_template="saiapr_tc-12/{file_name}")) == 5


def test_a_bad_image_template_is_refused_by_name(tmp_path, mini):
    data_root = _annotations(tmp_path, mini)
    with pytest.raises(ValueError, match=r"image_template 'train2014/\{id\}\.jpg' does not format with \{image_id\} "
                                         r"and \{file_name\}: KeyError"):
        ReferDataset(data_root, "refcocog", image_template="train2014/{id}.jpg")


# ---------------------------------------------------------------------------------------------- Hub adapter


def _hub(mini, image_path="coco/train2014/" + COCO_FILE):
    import datasets

    images = {i["id"]: i for i in mini["instances"]["images"]}
    anns = {a["id"]: a for a in mini["instances"]["annotations"]}
    return datasets.Dataset.from_list([
        {"ref_id": r["ref_id"], "ann_id": r["ann_id"], "image_id": r["image_id"], "split": r["split"],
         "sentences": r["sentences"], "raw_anns": json.dumps(anns[r["ann_id"]]),
         "raw_image_info": json.dumps(images[r["image_id"]]), "image_path": image_path.format(r["image_id"])}
        for r in mini["refs"]])


def test_hub_adapter_checks_image_root_and_image_path(tmp_path, mini, monkeypatch):
    hub = _hub(mini)
    ids = _image_ids(mini, None)
    _images(tmp_path / "data" / "coco" / "train2014", mini, leave_out=[ids[3]])
    # image_root names the coco/ folder itself: the image_path column already starts with coco/.
    with pytest.raises(FileNotFoundError) as err:
        HubRefCOCODataset(hub, image_root=tmp_path / "data" / "coco", source="my/refcoco")
    message = str(err.value)
    assert message.startswith(f"my/refcoco: 15 of 15 image files not found under image_root {tmp_path / 'data' / 'coco'}"
                              f", laid out as {tmp_path / 'data' / 'coco'}/<image_path>; missing: "
                              f"{tmp_path / 'data' / 'coco' / 'coco' / 'train2014' / COCO_FILE.format(ids[0])}, ")
    assert "found them" not in message  # one image is missing from the other layout too: it is not suggested
    _images(tmp_path / "data" / "coco" / "train2014", mini)
    with pytest.raises(FileNotFoundError) as err:
        HubRefCOCODataset(hub, image_root=tmp_path / "data" / "coco", source="my/refcoco")
    assert str(err.value).endswith(f"found them under {tmp_path / 'data'}: pass image_root {tmp_path / 'data'}")
    assert len(HubRefCOCODataset(hub, image_root=tmp_path / "data")) == 15

    # Without image_root the image_path column is relative to the current folder.
    monkeypatch.chdir(tmp_path / "data")
    assert len(HubRefCOCODataset(hub)) == 15
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="15 of 15 image files not found under image_root ., laid out as "
                                                r"<image_path>; missing: coco/train2014/"):
        HubRefCOCODataset(hub)


def test_hub_adapter_plain_layout_and_skipping(tmp_path, mini):
    hub = _hub(mini)
    ids = _image_ids(mini, None)
    _images(tmp_path / "train2014", mini)
    with pytest.raises(FileNotFoundError) as err:
        HubRefCOCODataset(hub, image_root=tmp_path, source="my/refcoco")
    assert str(err.value).endswith(
        f"found them as {tmp_path / 'train2014' / COCO_FILE.format(ids[0])}: link {tmp_path / 'train2014'} in as "
        f"{tmp_path / 'coco' / 'train2014'} (image_root / image path must name the file)")

    (tmp_path / "coco").mkdir()
    os.symlink(tmp_path / "train2014", tmp_path / "coco" / "train2014")  # as suggested
    (tmp_path / "train2014" / COCO_FILE.format(ids[7])).unlink()
    ds = HubRefCOCODataset(hub, image_root=tmp_path, source="my/refcoco", on_bad_record="skip")
    assert len(ds) == 14 and len(ds.skipped) == 1
    assert ds.skipped[0].startswith(f"my/refcoco: row 7: image file not found: "
                                    f"{tmp_path / 'coco' / 'train2014' / COCO_FILE.format(ids[7])} (my/refcoco: 1 of 15")
    assert ids[7] not in ds.image_ids


# ---------------------------------------------------------------------------------------------- commands


def _mllmseg(*args, cwd):
    return subprocess.run([sys.executable, "-m", "mllmseg", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=ENV, cwd=cwd)


def _one_line(proc, command):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mllmseg {command}: error: "), proc.stderr[-3000:]
    return lines[0]


def test_evaluate_reports_missing_images_before_loading_the_model(tmp_path, mini):
    """The model folder has a config.json but no model in it: it passes the quick path check and fails when it is
    loaded (the control run with every image present shows that), so the image message proves the data came first."""
    data_root = _annotations(tmp_path / "refer", mini)
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text(json.dumps({"model_type": "no_such_model_type"}))
    train = _image_ids(mini, "train")
    _images(data_root / REFER_TREE, mini, leave_out=[train[2]])
    base = ["evaluate", not_a_model, "--dataset", "refcocog", "--data-root", data_root, "--split", "train",
            "--output-dir", tmp_path / "out"]
    line = _one_line(_mllmseg(*base, cwd=tmp_path), "evaluate")
    assert "no_such_model_type" not in line
    assert f"refcocog refs(umd).p split train: 1 of {len(train)} image files not found under image_root {data_root}" in line
    assert str(data_root / REFER_TREE / COCO_FILE.format(train[2])) in line

    (tmp_path / "coco").mkdir()
    shutil.move(data_root / REFER_TREE, tmp_path / "coco" / "train2014")  # the plain COCO layout
    _images(tmp_path / "coco" / "train2014", mini)
    line = _one_line(_mllmseg(*base, cwd=tmp_path), "evaluate")
    template = "coco/train2014/COCO_train2014_{image_id:012d}.jpg"
    assert line.endswith(f"pass image_root {tmp_path} (--image-root) and image_template {template!r} (--image-template)")

    fixed = [*base, "--image-root", tmp_path, "--image-template", template]  # as suggested
    line = _one_line(_mllmseg(*fixed, cwd=tmp_path), "evaluate")  # the data is fine now: the model is reached
    assert "image files not found" not in line and "no_such_model_type" in line


def test_train_reports_missing_images_before_building_the_model(tmp_path, mini):
    data_root = _annotations(tmp_path / "refer", mini)
    train = _image_ids(mini, "train")
    _images(data_root / REFER_TREE, mini, leave_out=[train[0]])
    nowhere = tmp_path / "no_internvl_here"
    args = ["train", "tiny", f"data.train={{type: refer, data_root: {data_root}, dataset: refcocog, split: train}}",
            "model.tiny=null", f"model.internvl={nowhere}", "--output-dir", tmp_path / "run"]
    line = _one_line(_mllmseg(*args, cwd=tmp_path), "train")
    assert f"1 of {len(train)} image files not found" in line and str(nowhere) not in line
    assert str(data_root / REFER_TREE / COCO_FILE.format(train[0])) in line

    _images(data_root / REFER_TREE, mini)
    line = _one_line(_mllmseg(*args, cwd=tmp_path), "train")  # control: with the images there, the model is reached
    assert "image files not found" not in line and str(nowhere) in line

"""refer-layout loaders and the jxu124/refcoco Hub adapter, on the real RefCOCOg / constructed gRefCOCO fixtures.

The fixtures hold no pixels, so the tests write blank images of the recorded sizes under the COCO naming scheme.
Expected numbers come from the fixture files themselves (verification.json was rasterised with pycocotools
independently of this package).
"""
import json
import pickle
import shutil
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from mllmseg.data import refer as refer_module
from mllmseg.data.hub_refcoco import HubRefCOCODataset
from mllmseg.data.refer import GRefCOCODataset, ReferDataset

COCO_NAME = "images/mscoco/images/train2014/COCO_train2014_{:012d}.jpg"

# pycocotools' decode trips numpy 2's __array__ copy deprecation; nothing to act on here.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


@pytest.fixture(scope="module")
def root(tmp_path_factory, fixtures_dir, mini):
    """<root>/refcocog (pickle), <root>/grefcoco (json), and blank images for every fixture image."""
    root = tmp_path_factory.mktemp("refer")
    (root / "refcocog").mkdir()
    for name in ("refs(umd).p", "instances.json"):
        shutil.copy(mini["folder"] / name, root / "refcocog" / name)
    (root / "grefcoco").mkdir()
    for name in ("grefs(unc).json", "instances.json"):
        shutil.copy(fixtures_dir / "grefcoco_constructed" / name, root / "grefcoco" / name)
    for info in mini["instances"]["images"]:
        path = root / COCO_NAME.format(info["id"])
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (info["width"], info["height"]), 128).save(path)
    return root


def _write_layout(root, dataset, refs, instances, refs_name="refs(umd).json"):
    (root / dataset).mkdir(parents=True, exist_ok=True)
    with open(root / dataset / refs_name, "w") as f:
        json.dump(refs, f)
    with open(root / dataset / "instances.json", "w") as f:
        json.dump(instances, f)


def _coco_mask(segmentation, h, w):
    """Independent rasterisation (pycocotools directly) for expected values."""
    rles = mask_utils.frPyObjects(segmentation, h, w)
    return mask_utils.decode(rles).sum(axis=2) > 0


# ---------------------------------------------------------------------------------------------- RefCOCOg (umd)


def test_refcocog_counts_per_split(root, mini):
    sentences_per_split = Counter()
    for ref in mini["refs"]:
        sentences_per_split[ref["split"]] += len(ref["sentences"])
    for split in ("train", "val", "test"):
        ds = ReferDataset(root, "refcocog", split=split)
        assert len(ds) == 5  # one ref per image, 5 refs per split
        assert ds.num_referents == sentences_per_split[split]
        assert sum(len(s.referents) for s in ds) == sentences_per_split[split]
        assert {s.split for s in ds} == {split}
    everything = ReferDataset(root, "refcocog")
    assert (len(everything), everything.num_referents) == (15, 28)
    assert len(ReferDataset(root, "refcocog", split=["val", "test"])) == 10


def test_refcocog_masks_match_pycocotools_verification(root, mini):
    ds = ReferDataset(root, "refcocog", split_by="umd")
    seen = set()
    for sample in ds:
        for referent in sample.referents:
            v = mini["verification"][referent.ref_id]
            assert referent.mask.dtype == bool and referent.mask.shape == (v["height"], v["width"])
            assert int(referent.mask.sum()) == v["mask_area_px"]
            rle = mask_utils.encode(np.asfortranarray(referent.mask.astype(np.uint8)))
            assert rle["counts"].decode() == v["rle_counts"]
            ys, xs = np.nonzero(referent.mask)
            assert [xs.min(), ys.min(), xs.max(), ys.max()] == v["mask_bbox_xyxy_inclusive"]
            x, y, w, h = v["bbox_xywh"]
            assert referent.box == pytest.approx((x, y, x + w, y + h))
            assert referent.no_target is False
            seen.add(referent.ref_id)
    assert 29181 in seen and len(seen) == 15  # 29181 is the two-part polygon


def test_refcocog_texts_and_ids_follow_the_refs(root, mini):
    ds = ReferDataset(root, "refcocog")
    by_ref = {ref["ref_id"]: ref for ref in mini["refs"]}
    for sample in ds:
        for referent in sample.referents:
            sentences = by_ref[referent.ref_id]["sentences"]
            assert (referent.text, referent.sent_id) in [(s["sent"], s["sent_id"]) for s in sentences]
    raw = ReferDataset(root, "refcocog", text_key="raw")
    first = raw[0].referents[0]
    assert first.text == by_ref[first.ref_id]["sentences"][0]["raw"]


def test_image_path_is_built_from_image_id(root, mini):
    ds = ReferDataset(root, "refcocog")
    ref_file_names = {ref["image_id"]: ref["file_name"] for ref in mini["refs"]}
    for sample in ds:
        assert sample.image_path == str(root / COCO_NAME.format(sample.image_id))
        # the ref's file_name carries an _<ann_id> suffix and is not what we load
        assert not sample.image_path.endswith(ref_file_names[sample.image_id])
    sample = ds[3]
    assert sample.image.mode == "RGB" and sample.image.size == (sample.width, sample.height)
    # samples cross DataLoader worker processes by pickle, image loader included
    copy = pickle.loads(pickle.dumps(ds[4]))
    assert copy.image.size == (copy.width, copy.height)
    assert np.array_equal(copy.referents[0].mask, ds[4].referents[0].mask)


def test_masks_are_decoded_only_on_access(root, monkeypatch):
    calls = []
    real = refer_module.decode_segmentation
    monkeypatch.setattr(refer_module, "decode_segmentation", lambda *a: calls.append(1) or real(*a))
    ds = ReferDataset(root, "refcocog")
    assert calls == []
    sample = ds[0]
    assert len(calls) == 1 and len(sample.referents) == 2  # one ann decoded, shared by the ref's 2 sentences
    assert sample.referents[0].mask is not sample.referents[1].mask


def test_json_refs_file_is_accepted(tmp_path, mini, root):
    _write_layout(tmp_path, "refcocog", mini["refs"], mini["instances"])
    from_json = ReferDataset(tmp_path, "refcocog", image_root=root)
    from_pickle = ReferDataset(root, "refcocog")
    assert from_json.refs_path.name == "refs(umd).json"
    assert (len(from_json), from_json.num_referents) == (15, 28)
    a, b = from_json[7], from_pickle[7]
    assert a.image_path == b.image_path
    assert all(np.array_equal(x.mask, y.mask) and x.text == y.text for x, y in zip(a.referents, b.referents))


# ---------------------------------------------------------------------------------------------- gRefCOCO


def test_grefcoco_split_counts(root, fixtures_dir):
    with open(fixtures_dir / "grefcoco_constructed" / "grefs(unc).json") as f:
        grefs = json.load(f)
    # PROVENANCE: 15 single + 15 no-target spread as train 5 / val 5 / test 5 (-> testA or testB), 30 multi in val.
    records = Counter()
    for split in ("train", "val", "testA", "testB"):
        ds = GRefCOCODataset(root, split=split)
        records[split] = len(ds.records)
        assert ds.num_referents == sum(len(g["sentences"]) for g in grefs if g["split"] == split)
        assert sum(len(s.referents) for s in ds) == ds.num_referents
    assert records["train"] == 10 and records["val"] == 40 and records["testA"] + records["testB"] == 10
    assert len(GRefCOCODataset(root).records) == 60


def test_grefcoco_no_target_and_multi_target(root, mini, fixtures_dir):
    with open(fixtures_dir / "grefcoco_constructed" / "grefs(unc).json") as f:
        grefs = {g["ref_id"]: g for g in json.load(f)}
    anns = {a["id"]: a for a in mini["instances"]["annotations"]}
    kinds = Counter()
    for sample in GRefCOCODataset(root):
        for referent in sample.referents:
            g = grefs[referent.ref_id]
            kinds[g["kind"]] += 1
            if g["no_target"]:
                assert referent.no_target and referent.box is None
                assert referent.mask.shape == (sample.height, sample.width) and not referent.mask.any()
                continue
            parts = [_coco_mask(anns[a]["segmentation"], sample.height, sample.width) for a in g["ann_id"]]
            union = np.logical_or.reduce(parts)
            assert not referent.no_target
            assert np.array_equal(referent.mask, union)
            assert int(referent.mask.sum()) == int(union.sum())
            boxes = [anns[a]["bbox"] for a in g["ann_id"]]
            assert referent.box == pytest.approx((min(b[0] for b in boxes), min(b[1] for b in boxes),
                                                  max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)))
            if g["kind"] == "single_real":
                assert int(referent.mask.sum()) == mini["verification"][referent.ref_id]["mask_area_px"]
            else:
                assert len(parts) >= 2 and referent.mask.sum() > max(p.sum() for p in parts)
    assert kinds == {"single_real": 28, "no_target_real_sentence_moved": 15, "multi_target_constructed_text": 30}


# ---------------------------------------------------------------------------------------------- bad input


def test_missing_folder_and_files_name_the_path(tmp_path, mini):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "refcoco")):
        ReferDataset(tmp_path, "refcoco")
    (tmp_path / "refcocog").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        ReferDataset(tmp_path, "refcocog")
    assert str(tmp_path / "refcocog" / "refs(umd).p") in str(err.value)
    _write_layout(tmp_path, "refcocog", mini["refs"], mini["instances"])
    (tmp_path / "refcocog" / "instances.json").unlink()
    with pytest.raises(FileNotFoundError) as err:
        ReferDataset(tmp_path, "refcocog")
    assert str(tmp_path / "refcocog" / "instances.json") in str(err.value)


def test_missing_image_names_its_path(tmp_path, mini):
    _write_layout(tmp_path, "refcocog", mini["refs"], mini["instances"])
    with pytest.raises(FileNotFoundError, match="15 of 15 image files not found"):
        ReferDataset(tmp_path, "refcocog")  # checked at construction (tests/test_data_layouts.py has the details)
    sample = ReferDataset(tmp_path, "refcocog", check_images=False)[0]  # building the sample needs no image
    with pytest.raises(FileNotFoundError) as err:
        sample.image
    assert str(tmp_path / COCO_NAME.format(sample.image_id)) in str(err.value)


def test_malformed_records_are_reported_with_their_ids(tmp_path, mini):
    refs = json.loads(json.dumps(mini["refs"]))
    bad = refs[4]
    del bad["ann_id"]
    _write_layout(tmp_path / "a", "refcocog", refs, mini["instances"])
    with pytest.raises(ValueError, match=rf"ref_id {bad['ref_id']}.*missing key.*ann_id"):
        ReferDataset(tmp_path / "a", "refcocog")

    refs = json.loads(json.dumps(mini["refs"]))
    bad = next(r for r in refs if r["split"] == "val")
    bad["ann_id"] = 123456789
    _write_layout(tmp_path / "b", "refcocog", refs, mini["instances"])
    with pytest.raises(ValueError, match=rf"ref_id {bad['ref_id']}.*ann_id 123456789 not in"):
        ReferDataset(tmp_path / "b", "refcocog")
    # only the selected split is validated: loading train never looks at the bad val ref
    assert len(ReferDataset(tmp_path / "b", "refcocog", split="train", check_images=False)) == 5

    instances = json.loads(json.dumps(mini["instances"]))
    target = next(a for a in instances["annotations"] if a["id"] == mini["refs"][0]["ann_id"])
    target["segmentation"] = "not a polygon"
    _write_layout(tmp_path / "c", "refcocog", mini["refs"], instances)
    # checked (not rasterised) when the dataset is built, so a long run does not stop at the first bad sample
    with pytest.raises(ValueError, match=rf"ref_id {mini['refs'][0]['ref_id']}: ann_id {target['id']} in .*instances\.json: "
                                         "'segmentation': unsupported COCO segmentation of type str"):
        ReferDataset(tmp_path / "c", "refcocog")


def test_pickle_with_code_is_refused(tmp_path, mini):
    (tmp_path / "refcocog").mkdir()
    shutil.copy(mini["folder"] / "instances.json", tmp_path / "refcocog" / "instances.json")
    with open(tmp_path / "refcocog" / "refs(umd).p", "wb") as f:
        pickle.dump([{"ref_id": 1, "hook": print}], f)
    with pytest.raises(ValueError, match="builtins.print"):
        ReferDataset(tmp_path, "refcocog")


# ---------------------------------------------------------------------------------------------- Hub adapter


def _hub_rows(mini):
    """The fixture refs as rows of the jxu124/refcoco schema."""
    images = {i["id"]: i for i in mini["instances"]["images"]}
    anns = {a["id"]: a for a in mini["instances"]["annotations"]}
    rows = []
    for ref in mini["refs"]:
        ann = anns[ref["ann_id"]]
        x, y, w, h = ann["bbox"]
        rows.append({
            "sent_ids": ref["sent_ids"], "file_name": ref["file_name"], "ann_id": ref["ann_id"],
            "ref_id": ref["ref_id"], "image_id": ref["image_id"], "split": ref["split"],
            "sentences": ref["sentences"], "category_id": ref["category_id"],
            "raw_anns": json.dumps(ann), "raw_image_info": json.dumps(images[ref["image_id"]]),
            "raw_sentences": json.dumps(ref["sentences"]),
            "image_path": "coco/train2014/COCO_train2014_{:012d}.jpg".format(ref["image_id"]),
            "bbox": [x, y, x + w, y + h], "captions": [s["raw"] for s in ref["sentences"]],
            "global_image_id": f"coco.{ref['image_id']}", "anns_id": f"refcocog.{ref['ann_id']}",
        })
    return rows


def test_hub_adapter_matches_verification(tmp_path, mini):
    import datasets

    hub = datasets.Dataset.from_list(_hub_rows(mini))
    with pytest.raises(FileNotFoundError, match="15 of 15 image files not found"):
        HubRefCOCODataset(hub, image_root=tmp_path)  # checked at construction (details: tests/test_data_layouts.py)
    ds = HubRefCOCODataset(hub, image_root=tmp_path, check_images=False)
    assert (len(ds), ds.num_rows, sum(len(s.referents) for s in ds)) == (15, 15, 28)
    for sample in ds:
        for referent in sample.referents:
            v = mini["verification"][referent.ref_id]
            assert (sample.height, sample.width) == (v["height"], v["width"])
            assert int(referent.mask.sum()) == v["mask_area_px"]
            x, y, w, h = v["bbox_xywh"]
            assert referent.box == pytest.approx((x, y, x + w, y + h))
        assert sample.image_path == str(tmp_path / "coco/train2014/COCO_train2014_{:012d}.jpg".format(sample.image_id))
    val = HubRefCOCODataset(hub, image_root=tmp_path, split="val", check_images=False)
    assert len(val) == 5 and {s.split for s in val} == {"val"}

    sample = ds[0]
    with pytest.raises(FileNotFoundError, match="COCO_train2014_"):
        sample.image
    path = tmp_path / "coco/train2014/COCO_train2014_{:012d}.jpg".format(sample.image_id)
    path.parent.mkdir(parents=True)
    Image.new("RGB", (sample.width, sample.height)).save(path)
    assert ds[0].image.size == (sample.width, sample.height)


def test_hub_adapter_image_column_and_errors(mini):
    import datasets

    rows = _hub_rows(mini)[:3]
    for row in rows:
        info = json.loads(row["raw_image_info"])
        row["image"] = Image.new("RGB", (info["width"], info["height"]), (10, 20, 30))
    ds = HubRefCOCODataset(datasets.Dataset.from_list(rows))
    assert ds[1].image.getpixel((0, 0)) == (10, 20, 30)
    assert ds[1].image.size == (ds[1].width, ds[1].height)
    copy = pickle.loads(pickle.dumps(ds[2]))
    assert copy.image.size == (copy.width, copy.height) and copy.image_path is None

    with pytest.raises(ValueError, match="raw_anns"):
        HubRefCOCODataset(datasets.Dataset.from_list([{k: v for k, v in r.items() if k != "raw_anns"} for r in rows]))
    broken = [dict(r) for r in _hub_rows(mini)[:2]]
    broken[1]["raw_anns"] = "{not json"
    with pytest.raises(ValueError, match=rf"row 1 \(ref_id {broken[1]['ref_id']}\): column 'raw_anns' is not valid JSON"):
        HubRefCOCODataset(datasets.Dataset.from_list(broken))  # found when the adapter is built


def test_recipe_hub_source_reads_a_saved_dataset(tmp_path, mini):
    import datasets

    from mllmseg.training.trainer import build_samples

    datasets.DatasetDict({"train": datasets.Dataset.from_list(_hub_rows(mini))}).save_to_disk(tmp_path / "hub")
    for info in mini["instances"]["images"]:
        path = tmp_path / "coco/train2014/COCO_train2014_{:012d}.jpg".format(info["id"])
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (info["width"], info["height"])).save(path)
    samples = build_samples([{"type": "hub", "path": str(tmp_path / "hub"), "hub_split": "train",
                              "image_root": str(tmp_path), "split": "val"}])
    assert len(samples) == 5 and {s.split for s in samples} == {"val"}
    referent = samples[0].referents[0]
    assert int(referent.mask.sum()) == mini["verification"][referent.ref_id]["mask_area_px"]
    with pytest.raises(ValueError, match="no split 'test'"):
        build_samples({"type": "hub", "path": str(tmp_path / "hub"), "hub_split": "test"})


@pytest.mark.parametrize("segmentation, match", [
    ([[1e9, 1e9, 5, 5, 3, 9]], "far outside"),
    ([[float("inf"), 1, 5, 5, 3, 9]], "non-finite"),
    ([[-1e10, 1, 5, 5, 3, 9]], "far outside"),
    ([[1, 2, 3, 4, 5]], "5 values"),
    ([[1, 2, 3, 4]], "4 values"),
    ([[float("nan"), 2, 3, 4, 5, 6]], "non-finite"),
    ([["a", 2, 3, 4, 5, 6]], "non-numeric"),
    ({"size": [10, 20], "counts": "abc"}, "RLE size"),
    ("polygon", "unsupported"),
])
def test_bad_segmentations_are_refused_before_rasterising(segmentation, match):
    """Coordinates of 1e9 used to crash the process inside pycocotools; odd or NaN polygons became empty masks."""
    from mllmseg.data.masks import BadSegmentationError, decode_segmentation

    with pytest.raises(BadSegmentationError, match=match):
        decode_segmentation(segmentation, 40, 30)


def test_good_segmentations_still_decode():
    from mllmseg.data.masks import decode_segmentation

    mask = decode_segmentation([[8, 8, 20, 8, 20, 30, 8, 30], [-3, -3, 5, -3, 5, 5, -3, 5]], 40, 30)  # a part reaches outside
    assert mask.shape == (40, 30) and mask[10, 10] and mask[0, 0] and not mask[35, 25]

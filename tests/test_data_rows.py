"""Own data (`mllmseg.data.rows`): rows of image + expression + mask from a JSONL file, a folder in datasets'
imagefolder layout, or a `datasets.Dataset`, in every mask format; bad rows name the file, the row and the column."""
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from mllmseg.data.rows import BadRowError, ReferringRowsDataset, write_rows_folder

H, W = 40, 60


def _scene(tmp_path):
    """Two images; masks written as PNG, RLE, polygon and null (no target)."""
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg"):
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(tmp_path / name)
    square = np.zeros((H, W), dtype=bool)
    square[5:15, 10:30] = True
    (tmp_path / "masks").mkdir()
    Image.fromarray(square.astype(np.uint8) * 255).save(tmp_path / "masks" / "square.png")
    blob = np.zeros((H, W), dtype=bool)
    blob[20:35, 40:55] = True
    rle = mask_utils.encode(np.asfortranarray(blob.astype(np.uint8)))
    rle = {"size": list(rle["size"]), "counts": rle["counts"].decode()}
    triangle = [[2.0, 2.0, 20.0, 2.0, 2.0, 20.0]]
    rows = [
        {"file_name": "a.png", "expression": "the square", "mask": "masks/square.png"},
        {"file_name": "a.png", "expression": ["the blob", "the thing on the right"], "mask": rle},
        {"file_name": "b.jpg", "expression": "the triangle", "mask": triangle},
        {"file_name": "b.jpg", "expression": "the unicorn", "mask": None},
    ]
    with open(tmp_path / "metadata.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return square, blob, triangle


def test_folder_rows_become_samples_with_every_mask_format(tmp_path):
    square, blob, triangle = _scene(tmp_path)
    data = ReferringRowsDataset(tmp_path)
    assert len(data) == 2  # rows grouped by image
    a, b = data[0], data[1]
    assert (a.height, a.width) == (H, W) and a.image.size == (W, H) and a.image_path.endswith("a.png")
    assert [r.text for r in a.referents] == ["the square", "the blob", "the thing on the right"]
    np.testing.assert_array_equal(a.referents[0].mask, square)
    np.testing.assert_array_equal(a.referents[1].mask, blob)
    np.testing.assert_array_equal(a.referents[2].mask, blob)
    assert a.referents[0].box == (10.0, 5.0, 30.0, 15.0) and not a.referents[0].no_target
    expected = mask_utils.decode(mask_utils.frPyObjects(triangle, H, W)).sum(axis=2) > 0
    np.testing.assert_array_equal(b.referents[0].mask, expected)
    unicorn = b.referents[1]
    assert unicorn.no_target and unicorn.box is None and not unicorn.mask.any()


def test_the_same_folder_through_datasets_imagefolder_and_a_column_mapping(tmp_path):
    """`datasets.load_dataset("imagefolder")` reads the folder too (its `image` column decoded by datasets);
    renamed columns map with `columns=`; the samples are the same. (An Arrow column holds one type, so a folder meant
    for datasets keeps one mask format per column: polygons and nulls here.)"""
    import datasets

    rng = np.random.default_rng(1)
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(tmp_path / name)
    # one row per image file: datasets' imagefolder before 4.0 keeps only the last row of a repeated file_name
    rows = [{"file_name": "a.png", "expression": "the triangle", "mask": [[2.0, 2.0, 20.0, 2.0, 2.0, 20.0]]},
            {"file_name": "b.png", "expression": "nothing", "mask": None},
            {"file_name": "c.png", "expression": "the quad", "mask": [[30.0, 5.0, 50.0, 5.0, 50.0, 30.0, 30.0, 30.0]]}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    ours = ReferringRowsDataset(tmp_path)
    hub = datasets.load_dataset("imagefolder", data_dir=str(tmp_path), split="train", cache_dir=str(tmp_path / "cache"))
    hub = hub.rename_columns({"expression": "sentence", "mask": "segmentation"})
    theirs = ReferringRowsDataset(hub, columns={"expression": "sentence", "mask": "segmentation"})
    assert len(theirs) == len(ours) == 3
    for x, y in zip(ours, theirs):
        assert [r.text for r in x.referents] == [r.text for r in y.referents]
        assert np.array_equal(np.asarray(x.image), np.asarray(y.image))
        for rx, ry in zip(x.referents, y.referents):
            np.testing.assert_array_equal(rx.mask, ry.mask)
            assert rx.no_target == ry.no_target and rx.mask.any() != rx.no_target


def test_in_memory_rows_with_pil_images_and_array_masks():
    image = Image.new("RGB", (W, H), "white")
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[1:3, 2:5] = 1
    data = ReferringRowsDataset([{"image": image, "expression": "the dot", "mask": mask, "image_id": "x"},
                                 {"image": image, "expression": "nothing", "mask": None, "image_id": "x"}])
    assert len(data) == 1
    sample = data[0]
    assert sample.image_id == "x" and sample.image_path is None
    assert sample.referents[0].mask.sum() == 6 and sample.referents[1].no_target


@pytest.mark.parametrize("row, message", [
    ({"file_name": "a.png", "expression": "", "mask": None}, "row 0 column 'expression': expected a non-empty string"),
    ({"file_name": "a.png", "expression": 7, "mask": None}, "row 0 column 'expression': expected a string or"),
    ({"file_name": "a.png", "expression": "x", "mask": [[1, 2, 3]]}, "row 0 column 'mask': polygon 0 has 3 values"),
    ({"file_name": "a.png", "expression": "x", "mask": {"size": [3, 3], "counts": "x"}},
     "row 0 column 'mask': RLE size [3, 3] is not the image's"),
    ({"file_name": "nope.png", "expression": "x", "mask": None}, "row 0 column 'file_name': image file not found"),
    ({"file_name": "a.png", "expression": "x", "mask": "masks/none.png"}, "row 0 column 'mask': mask file not found"),
    ({"file_name": "a.png", "expression": "x", "mask": "small.png"}, "row 0 column 'mask': mask is 6x4 but the image is 60x40"),
    ({"file_name": 3, "expression": "x", "mask": None}, "row 0 column 'file_name': expected an image path"),
    ({"file_name": "notes.txt", "expression": "x", "mask": None}, "row 0 column 'file_name': not a readable image"),
])
def test_bad_rows_name_the_file_row_and_column(tmp_path, row, message):
    Image.new("RGB", (W, H)).save(tmp_path / "a.png")
    Image.new("L", (6, 4)).save(tmp_path / "small.png")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "metadata.jsonl").write_text(json.dumps(row) + "\n")
    data = ReferringRowsDataset(tmp_path)
    with pytest.raises((BadRowError, FileNotFoundError)) as info:
        data[0]
    assert str(tmp_path / "metadata.jsonl") in str(info.value) and message in str(info.value)


def test_bad_files_and_columns(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"image": "a.png", "expression": "x", "mask": null}\n{"image": oops}\n')
    with pytest.raises(BadRowError, match=r"rows.jsonl line 2: not valid JSON"):
        ReferringRowsDataset(tmp_path / "rows.jsonl")
    (tmp_path / "rows.jsonl").write_text('{"img": "a.png", "text": "x", "mask": null}\n')
    with pytest.raises(BadRowError, match=r"no column\(s\) \['image', 'expression'\] .* map yours with columns="):
        ReferringRowsDataset(tmp_path / "rows.jsonl")
    assert len(ReferringRowsDataset(tmp_path / "rows.jsonl", columns={"image": "img", "expression": "text"})) == 1
    with pytest.raises(BadRowError, match=r"unknown key\(s\) \['caption'\]"):
        ReferringRowsDataset(tmp_path / "rows.jsonl", columns={"caption": "text"})


def test_a_mask_drawn_on_the_rotated_photo_is_refused_with_the_reason(tmp_path):
    """A phone photo stored 60 x 40 with EXIF orientation 6 is seen as 40 x 60; a mask drawn in that view is not in
    the stored frame the annotations use, and is refused rather than trained on misaligned."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (W, H)).save(tmp_path / "phone.jpg", exif=exif)
    Image.new("L", (H, W), 255).save(tmp_path / "viewer_mask.png")
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "phone.jpg", "expression": "x", "mask": "viewer_mask.png"}) + "\n")
    with pytest.raises(BadRowError, match="matches the EXIF-rotated image: masks are in the stored frame"):
        ReferringRowsDataset(tmp_path)[0]


def test_own_rows_train_from_a_recipe(tmp_path):
    """`data.train: {type: rows, source: FOLDER}` trains through the same pipeline as the built-in sources."""
    import json as _json

    from mllmseg.training.recipes import load_recipe
    from mllmseg.training.trainer import run_training

    _scene(tmp_path / "data" if (tmp_path / "data").mkdir() is None else None)
    recipe = load_recipe("tiny", [
        "model.tiny.image_size=56", "model.tiny.vision_width=32", "model.tiny.text_width=32",
        f"data.train={{type: rows, source: {tmp_path / 'data'}}}", "training.max_steps=2",
        "training.per_device_train_batch_size=2", "training.save_strategy=no", "training.warmup_steps=0"])
    result = run_training(recipe, output_dir=str(tmp_path / "run"))
    assert result["global_step"] == 2
    summary = _json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["recipe"]["data"]["train"]["type"] == "rows"


def test_written_rows_folders_read_back_as_the_same_samples(tmp_path):
    from mllmseg.data.synthetic import SyntheticReferringDataset

    scenes = SyntheticReferringDataset(6, image_size=(48, 64), size_range=(0.15, 0.25), no_target_prob=0.3,
                                       multi_target_prob=0.3, referents_per_image=4)
    folder = write_rows_folder(scenes, tmp_path / "rows")
    back = ReferringRowsDataset(folder)
    assert len(back) == len(scenes)
    no_targets = 0
    for i in range(len(scenes)):
        want, got = scenes[i], back[i]
        assert got.image_id == want.image_id
        assert np.array_equal(np.asarray(got.image), np.asarray(want.image))  # PNG: lossless
        assert [r.text for r in got.referents] == [r.text for r in want.referents]
        for a, b in zip(got.referents, want.referents):
            assert a.no_target == b.no_target and np.array_equal(a.mask, b.mask) and a.box == b.box
            no_targets += a.no_target
    assert no_targets > 0
    with pytest.raises(FileExistsError, match="rows"):
        write_rows_folder(scenes, folder)


def test_an_interrupted_rows_write_leaves_nothing_behind(tmp_path):
    from mllmseg.data.synthetic import SyntheticReferringDataset

    scenes = SyntheticReferringDataset(3, image_size=(32, 32), size_range=(0.2, 0.3))

    class Failing:
        def __len__(self):
            return 3

        def __getitem__(self, i):
            if i == 2:
                raise OSError("disk full")
            return scenes[i]

    with pytest.raises(OSError, match="disk full"):
        write_rows_folder(Failing(), tmp_path / "rows")
    assert list(tmp_path.iterdir()) == []

"""`mllmseg.atomic.staged_folder`: a folder appears whole or not at all (real files, real renames)."""
import pytest

from mllmseg.atomic import staged_folder


def test_the_folder_appears_only_when_the_block_ends(tmp_path):
    target = tmp_path / "out"
    with staged_folder(target) as staging:
        (staging / "a.txt").write_text("a")
        assert not target.exists() and staging.parent == tmp_path
    assert (target / "a.txt").read_text() == "a"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failing_block_leaves_the_old_folder_and_nothing_else(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(OSError, match="disk full"):
        with staged_folder(target, replace=True) as staging:
            (staging / "new.txt").write_text("half")
            raise OSError("disk full")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_replace_swaps_the_whole_folder(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with staged_folder(target, replace=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_existing_folder_is_refused_unless_replace_and_a_file_always(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="out already exists"):
        with staged_folder(tmp_path / "out"):
            pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        with staged_folder(tmp_path / "file", replace=True):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out"]

"""Recipes: built-in YAML files carry SPEC section 4's values; overrides; the train CLI's argument handling."""
import json

import pytest

from mllmseg.cli import main
from mllmseg.training.recipes import RECIPE_DIR, apply_overrides, list_recipes, load_recipe


def test_builtin_recipes_follow_the_paper():
    assert {"tiny", "res_8b", "gres_8b"} <= set(list_recipes())
    for name, steps in (("res_8b", 50000), ("gres_8b", 20000)):
        r = load_recipe(name)
        t = r["training"]
        assert t["max_steps"] == steps and t["learning_rate"] == 4e-5 and t["lr_scheduler_type"] == "cosine"
        assert t["warmup_ratio"] == 0.03 and t["weight_decay"] == 0.05 and t["bf16"] and t["gradient_checkpointing"]
        assert t["per_device_train_batch_size"] * t["gradient_accumulation_steps"] * 4 == 32
        assert r["lora"] == {"r": 64, "alpha": 128, "dropout": 0.05, "embeddings": "new_tokens"}
        assert (RECIPE_DIR / t["deepspeed"]).is_file()
        assert json.loads((RECIPE_DIR / t["deepspeed"]).read_text())["zero_optimization"]["stage"] == 1
    assert [d["dataset"] for d in load_recipe("res_8b")["data"]["train"]] == ["refclef", "refcoco", "refcoco+", "refcocog"]
    assert load_recipe("gres_8b")["data"]["train"][0]["type"] == "grefcoco"
    assert json.loads((RECIPE_DIR / "zero2.json").read_text())["zero_optimization"]["stage"] == 2


def test_overrides():
    r = apply_overrides({"training": {"max_steps": 5}}, ["training.max_steps=7", "lora.r=8", "model.tiny.text_width=32",
                                                         "data.train.image_size=[56, 56]"])
    assert r["training"]["max_steps"] == 7 and r["lora"] == {"r": 8} and r["data"]["train"]["image_size"] == [56, 56]
    # YAML 1.1 reads "1e-3" as a string; a learning rate typed that way must still be a number.
    r = apply_overrides({}, ["training.learning_rate=1e-3", "model.internvl=/models/x", "name=tiny-1"])
    assert r["training"]["learning_rate"] == 1e-3 and r["model"]["internvl"] == "/models/x" and r["name"] == "tiny-1"
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, ["training.max_steps"])
    with pytest.raises(ValueError, match="unknown recipe sections"):
        load_recipe("tiny", ["trainig.max_steps=3"])


def test_train_cli_print_recipe_and_errors(capsys):
    assert main(["train", "tiny", "training.max_steps=9", "--print-recipe"]) == 0
    assert "max_steps: 9" in capsys.readouterr().out
    assert main(["train", "no-such-recipe"]) == 2
    assert "no recipe file" in capsys.readouterr().err
    assert main(["merge-lora", "/nonexistent/adapter", "/tmp/x"]) == 2


def test_recipe_base_is_merged_under_the_recipe(tmp_path):
    tiny, self1e = load_recipe("tiny"), load_recipe("tiny_self1e")
    assert self1e["model"]["tiny"] == {**tiny["model"]["tiny"], "mask_head": "self1e"}
    assert (self1e["data"], self1e["training"]) == (tiny["data"], tiny["training"]) and self1e["name"] == "tiny_self1e"
    # a user recipe beside its base, overriding one value deep down; overrides apply after the merge
    (tmp_path / "mine.yaml").write_text("base: tiny\ntraining: {max_steps: 7}\n")
    mine = load_recipe(str(tmp_path / "mine.yaml"), ["training.learning_rate=2e-4"])
    assert mine["training"]["max_steps"] == 7 and mine["training"]["learning_rate"] == 2e-4
    assert mine["training"]["per_device_train_batch_size"] == tiny["training"]["per_device_train_batch_size"]
    (tmp_path / "a.yaml").write_text("base: b\n")
    (tmp_path / "b.yaml").write_text("base: a\n")
    with pytest.raises(ValueError, match="loops"):
        load_recipe(str(tmp_path / "a.yaml"))


def test_paper_recipes_build_their_training_arguments(tmp_path):
    """transformers 5 has no `warmup_ratio` field (a float `warmup_steps` < 1 is the ratio); the 8B recipes' 3% warmup
    used to stop TrainingArguments with a TypeError."""
    from mllmseg.training.trainer import training_arguments

    for name in ("res_8b", "gres_8b"):
        recipe = load_recipe(name, ["training.deepspeed=null", "training.bf16=false"])
        args = training_arguments(recipe, str(tmp_path / name))
        steps = recipe["training"]["max_steps"]
        assert args.get_warmup_steps(steps) == round(0.03 * steps)


def test_recipe_keys_are_checked_with_a_suggestion(tmp_path):
    with pytest.raises(ValueError, match=r"unknown recipe key 'training\.max_step'.*did you mean 'training\.max_steps'"):
        load_recipe("tiny", ["training.max_step=5"])
    (tmp_path / "mine.yaml").write_text("base: tiny\ndata: {max_lenght: 20}\n")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'mine.yaml'}: unknown recipe key 'data\.max_lenght'.*'data\.max_length'"):
        load_recipe(str(tmp_path / "mine.yaml"))
    for name in list_recipes():  # every built-in recipe passes its own check
        load_recipe(name)

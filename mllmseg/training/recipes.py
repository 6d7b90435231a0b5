"""Training recipes: YAML files (`mllmseg/recipes/*.yaml`, or any path) with `key.sub=value` overrides.

Every key of a resolved recipe is checked against what reads it (the `TrainingArguments` fields, the data sources'
loaders, `LoraRecipe`, the tiny model's arguments...): a typo stops with the key and the closest valid one instead of a
`TypeError` later, or a setting silently ignored.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import re
from pathlib import Path
from typing import Any

import yaml

RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes"
_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
SECTIONS = ("name", "description", "model", "lora", "data", "training", "seed", "output_dir", "evaluation")
MODEL_KEYS = ("tiny", "internvl", "pretrained", "dtype", "system_message", "bos_token_in_prompt", "config")
DATA_KEYS = ("train", "max_expressions", "tiling", "jpeg_prob", "eval_prompt_prob", "max_length", "on_bad_record")
# Accepted beside the TrainingArguments fields: translated by `training_arguments` for the installed release.
TRAINING_ALIASES = ("gradient_checkpointing", "activation_checkpointing", "gradient_checkpointing_kwargs",
                    "activation_checkpointing_kwargs", "warmup_ratio")


class RecipeError(ValueError):
    """A recipe that cannot be read or used (the message names the file or the override, and the key)."""


def _yaml_error(error: Exception, where: str) -> RecipeError:
    """A PyYAML error as one line naming `where` and, when PyYAML knows them, the line and column (1-based)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    context = getattr(error, "context", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    text = f"{where}: YAML syntax error{at}: {problem}"
    context_mark = getattr(error, "context_mark", None)
    if context and context_mark is not None:
        text += f" ({context} started at line {context_mark.line + 1}, column {context_mark.column + 1})"
    return RecipeError(text)


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    builtin = RECIPE_DIR / f"{name_or_path}.yaml"
    if builtin.is_file():
        return builtin
    raise FileNotFoundError(f"no recipe file {name_or_path!r} and no built-in recipe of that name (built-in: {list_recipes()})")


def apply_overrides(recipe: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`a.b.c=value` (value parsed as YAML: numbers, booleans, null, lists) sets recipe["a"]["b"]["c"]."""
    recipe = copy.deepcopy(recipe)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value (e.g. training.max_steps=100)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as error:
            raise _yaml_error(error, f"override {item!r}") from None
        if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value):
            # PyYAML follows YAML 1.1, where "1e-3" (no dot) is a string: read it as the number the user meant.
            value = float(value)
        node = recipe
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
            node = node[part]
        node[parts[-1]] = value
    return recipe


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, mappings merged key by key (a null or non-mapping value replaces). A mapping whose `type`
    differs from the base's (a refer data source over a synthetic one) replaces it too: the base's keys belong to
    another kind of thing."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        below = out.get(key)
        mergeable = isinstance(value, dict) and isinstance(below, dict) and value.get("type", below.get("type")) == below.get("type")
        out[key] = _merge(below, value) if mergeable else value
    return out


def _read_recipe(name_or_path: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    path = recipe_path(name_or_path)
    if str(path) in seen:
        raise ValueError(f"{path}: recipe `base` chain loops ({' -> '.join(seen + (str(path),))})")
    with open(path, "r", encoding="utf-8") as f:
        try:
            recipe = yaml.safe_load(f) or {}
        except yaml.YAMLError as error:
            raise _yaml_error(error, str(path)) from None
    if not isinstance(recipe, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping")
    base = recipe.pop("base", None)
    if base is None:
        return recipe
    # A relative base is looked up beside the recipe first, then among the built-in recipes.
    beside = path.parent / str(base)
    beside_yaml = beside.with_suffix(".yaml")
    base_ref = str(beside) if beside.is_file() else str(beside_yaml) if beside_yaml.is_file() else str(base)
    return _merge(_read_recipe(base_ref, seen + (str(path),)), recipe)


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """A recipe file (or built-in name) with `base: OTHER` resolved (its sections merged under this one's) and the
    `key.sub=value` overrides applied; every key is checked (`unknown_keys`)."""
    path = recipe_path(name_or_path)
    overrides = list(overrides or [])
    recipe = apply_overrides(_read_recipe(name_or_path), overrides)
    unknown = set(recipe) - set(SECTIONS)
    if unknown:
        raise RecipeError(f"{path}: unknown recipe sections {sorted(unknown)} (valid: {', '.join(SECTIONS)})")
    problems = unknown_keys(recipe)
    if problems:
        key, valid, note = problems[0]
        origin = next((o for o in overrides if o.split("=", 1)[0].strip() == key), None)
        where = f"override {origin!r}" if origin else str(path)
        close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1, cutoff=0.6)
        parent = key.rsplit(".", 1)[0]
        hint = f"did you mean '{parent}.{close[0]}'?" if close else f"valid keys there: {', '.join(sorted(valid))}"
        more = f" ({len(problems) - 1} more unknown key(s))" if len(problems) > 1 else ""
        raise RecipeError(f"{where}: unknown recipe key '{key}'{note}; {hint}{more}")
    return recipe


def _parameters(fn, skip=("self", "tokenizer", "kwargs")) -> set[str]:
    """Named parameters of a callable (a class: of its `__init__`)."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    return {name for name, p in inspect.signature(target).parameters.items()
            if name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _tiny_model_keys() -> set[str]:
    """`model.tiny` keys: `build_tiny_model` / `tiny_config` arguments and the `MLLMSegConfig` fields they pass on."""
    from ..remote_code.configuration_mllmseg import MLLMSegConfig
    from ..tiny import build_tiny_model, tiny_config

    config = ({f.name for f in dataclasses.fields(MLLMSegConfig)} if dataclasses.is_dataclass(MLLMSegConfig)
              else _parameters(MLLMSegConfig))
    return _parameters(build_tiny_model) | _parameters(tiny_config) | config


def _training_keys() -> set[str]:
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments)} | set(TRAINING_ALIASES)


def _source_problems(source: Any, key: str) -> list[tuple[str, set[str], str]]:
    """Unknown keys of one `data.train` source, checked against its loader's arguments."""
    from .trainer import data_source_keys

    if not isinstance(source, dict) or source.get("type") is None:
        return []  # build_samples names the missing or unknown type
    valid = data_source_keys(source["type"])
    if valid is None:
        return []
    note = f" (a {source['type']} data source)"
    return [(f"{key}.{name}", valid | {"type"}, note) for name in source if name not in valid and name != "type"]


def unknown_keys(recipe: dict[str, Any]) -> list[tuple[str, set[str], str]]:
    """`(dotted key, valid keys beside it, a note on what reads them)` for every key of `recipe` that nothing reads."""
    problems: list[tuple[str, set[str], str]] = []

    def check(section: str, valid: set[str]) -> None:
        values = recipe.get(section)
        if isinstance(values, dict):
            problems.extend((f"{section}.{k}", valid, "") for k in values if k not in valid)

    check("model", set(MODEL_KEYS))
    tiny = (recipe.get("model") or {}).get("tiny") if isinstance(recipe.get("model"), dict) else None
    if isinstance(tiny, dict):
        valid = _tiny_model_keys()
        problems.extend((f"model.tiny.{k}", valid, "") for k in tiny if k not in valid)
    if isinstance(recipe.get("lora"), dict):
        from .lora import LoraRecipe

        check("lora", {f.name for f in dataclasses.fields(LoraRecipe)})
    check("data", set(DATA_KEYS))
    train = (recipe.get("data") or {}).get("train") if isinstance(recipe.get("data"), dict) else None
    if isinstance(train, dict):
        problems.extend(_source_problems(train, "data.train"))
    elif isinstance(train, list):
        for k, source in enumerate(train):
            problems.extend(_source_problems(source, f"data.train.{k}"))
    check("training", _training_keys())
    return problems


def synthetic_scene_kwargs(recipe: dict[str, Any] | str = "tiny") -> dict[str, Any]:
    """`SyntheticReferringDataset` keyword arguments of a recipe's (first) synthetic training source, without its
    length, split and seed: held-out sets drawn from the training distribution."""
    if isinstance(recipe, str):
        recipe = load_recipe(recipe)
    sources = recipe["data"]["train"]
    sources = [sources] if isinstance(sources, dict) else sources
    synthetic = [s for s in sources if s.get("type") == "synthetic"]
    if not synthetic:
        raise ValueError(f"recipe {recipe.get('name')!r} has no synthetic data source")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in synthetic[0].items()
            if k not in ("type", "num_images", "split", "seed")}


__all__ = ["load_recipe", "synthetic_scene_kwargs", "apply_overrides", "list_recipes", "recipe_path", "unknown_keys",
           "RecipeError", "RECIPE_DIR"]

"""Training recipes: YAML files (`mllmseg/recipes/*.yaml`, or any path) with `key.sub=value` overrides."""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes"
_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


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
        value = yaml.safe_load(raw) if raw != "" else ""
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
    """`top` over `base`, mappings merged key by key (a null or non-mapping value replaces)."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_recipe(name_or_path: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    path = recipe_path(name_or_path)
    if str(path) in seen:
        raise ValueError(f"{path}: recipe `base` chain loops ({' -> '.join(seen + (str(path),))})")
    with open(path, "r", encoding="utf-8") as f:
        recipe = yaml.safe_load(f) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"{path}: a recipe is a YAML mapping")
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
    `key.sub=value` overrides applied."""
    path = recipe_path(name_or_path)
    recipe = apply_overrides(_read_recipe(name_or_path), overrides or [])
    unknown = set(recipe) - {"name", "description", "model", "lora", "data", "training", "seed", "output_dir", "evaluation"}
    if unknown:
        raise ValueError(f"{path}: unknown recipe sections {sorted(unknown)}")
    return recipe


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


__all__ = ["load_recipe", "synthetic_scene_kwargs", "apply_overrides", "list_recipes", "recipe_path", "RECIPE_DIR"]

"""The quickstart's pieces (issue 22): the pretrained tiny MLLMSeg that ships with the package, the held-out scene
sets it is scored on, and a LoRA fine-tune on a concept it has never seen.

The shipped base (``mllmseg/pretrained/tiny-base``) stands in for InternVL's pretraining: it was trained once with
``mllmseg train tiny_base`` (``mllmseg/recipes/tiny_base.yaml``) and frozen into a remote-code folder with
``benchmarks/ship_tiny_base.py``. It has never seen the colour ``cyan`` (``NEW_CONCEPT``); the quickstart teaches it
that word from a rows folder, the format of a user's own data, with the ``tiny_lora`` recipe.

`mllmseg quickstart` (``mllmseg/commands/quickstart.py``) runs the four steps; this module holds what they share
with the tests and ``benchmarks/quickstart_targets.py``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
TINY_BASE_DIR = PRETRAINED_DIR / "tiny-base"
# The fixed small held-out set whose metrics the shipped folder records (tests check them exactly).
RECORDED_METRICS_FILE = "heldout_metrics.json"
RECORDED_SET = {"num_images": 16, "seed": 0, "split": "validation"}
BASE_RECIPE = "tiny_base"
FINETUNE_RECIPE = "tiny_lora"
NEW_CONCEPT = "cyan"
# Split names of the scene sets (disjoint random streams): pretraining draws "train".
HELDOUT_SPLIT = "validation"
CONCEPT_HELDOUT_SPLIT = "validation-concept"
FINETUNE_SPLIT = "finetune"
METRIC_KEYS = ("cIoU", "gIoU_per_expression", "prec@0.5", "N-acc", "T-acc")


def tiny_base_path() -> Path:
    """The shipped pretrained tiny base: a folder `AutoModel` / `AutoProcessor` load with `trust_remote_code=True`.

    Raises a FileNotFoundError naming the folder when it is missing, or holds Git LFS pointers instead of weights."""
    weights = TINY_BASE_DIR / "model.safetensors"
    if not (TINY_BASE_DIR / "config.json").is_file() or not weights.is_file():
        raise FileNotFoundError(
            f"the pretrained tiny base is not in {TINY_BASE_DIR} (config.json and model.safetensors expected); it ships "
            "with the repository: use a full git checkout, or rebuild it with `mllmseg train tiny_base` and "
            "`python benchmarks/ship_tiny_base.py outputs/tiny_base/final`")
    with weights.open("rb") as f:
        head = f.read(64)
    if head.startswith(b"version https://git-lfs"):
        raise FileNotFoundError(f"{weights} is a Git LFS pointer, not the weights: run `git lfs pull`")
    return TINY_BASE_DIR


def scene_kwargs() -> dict[str, Any]:
    """The pretraining scenes' `SyntheticReferringDataset` arguments (from the `tiny_base` recipe)."""
    from .training.recipes import synthetic_scene_kwargs

    return synthetic_scene_kwargs(BASE_RECIPE)


class FinerCategories:
    """A scene set whose "attribute" expressions are split by what they name: `colour` ("the red shape"), `shape`
    ("the circle") or `colour + shape` ("the red circle"); other categories as they are. Evaluation then reports
    each (the issue's categories are colour, shape, position, size, multi)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        from dataclasses import replace

        sample = self.dataset[index]
        sample.referents = [replace(r, category=attribute_kind(r.text, r.category)) for r in sample.referents]
        return sample


def attribute_kind(text: str, category: str | None) -> str | None:
    """`colour`, `shape` or `colour + shape` for an attribute expression; `category` for the others."""
    from .data.synthetic import ALL_COLORS, SHAPES

    if category != "attribute":
        return category
    words = set(text.split())
    colour, shape = bool(words & set(ALL_COLORS)), bool(words & set(SHAPES))
    return "colour + shape" if colour and shape else "colour" if colour else "shape"


def heldout_scenes(num_images: int, seed: int = 0, concept: str | None = None, split: str | None = None,
                   finer_categories: bool = True):
    """Held-out scenes: the pretraining distribution (`concept=None`), or scenes in which every expression mentions
    `concept` (a colour of `EXTRA_COLORS`: the first shape wears it, the other shapes draw from the six old colours
    and it). `finer_categories`: attribute expressions reported as colour / shape / colour + shape
    ([`FinerCategories`])."""
    from .data.synthetic import COLORS, SyntheticReferringDataset

    kwargs = scene_kwargs()
    if concept is not None:
        kwargs.update(colors=tuple(COLORS) + (concept,), featured_color=concept, featured_prob=1.0)
    split = split or (CONCEPT_HELDOUT_SPLIT if concept else HELDOUT_SPLIT)
    dataset = SyntheticReferringDataset(num_images, seed=seed, split=split, **kwargs)
    return FinerCategories(dataset) if finer_categories else dataset


def finetune_scenes(num_images: int, seed: int = 0, concept: str = NEW_CONCEPT, featured_prob: float = 0.5):
    """The fine-tuning scenes: every scene has a `concept` shape; an expression mentions it with probability
    `featured_prob` and otherwise is any expression the scene offers (the old concepts, so they are not forgotten)."""
    from .data.synthetic import COLORS, SyntheticReferringDataset

    kwargs = dict(scene_kwargs(), colors=tuple(COLORS) + (concept,), featured_color=concept,
                  featured_prob=featured_prob)
    return SyntheticReferringDataset(num_images, seed=seed, split=FINETUNE_SPLIT, **kwargs)


def concept_token_ids(tokenizer, word: str) -> list[int]:
    """The ids a word takes inside a prompt (" word", after a space): the embedding rows a fine-tune on that word
    trains (`lora.extra_token_ids`). Prompts put a space before every word of an expression after the first."""
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"the tokenizer gives no tokens for {word!r}")
    return [int(i) for i in ids]


def finetune_recipe(base: str | Path, rows_folder: str | Path, token_ids: Sequence[int],
                    overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The `tiny_lora` recipe pointed at `base` and `rows_folder`, training the embedding rows `token_ids` too."""
    from .training.recipes import load_recipe

    fixed = [f"model.pretrained={Path(base)}", f"data.train.source={Path(rows_folder)}",
             f"lora.extra_token_ids=[{', '.join(str(int(i)) for i in token_ids)}]"]
    return load_recipe(FINETUNE_RECIPE, fixed + list(overrides))


def finetune_on_concept(base: str | Path, output_dir: str | Path, tokenizer, concept: str = NEW_CONCEPT,
                        seed: int = 0, train_images: int = 1000, steps: int | None = None,
                        overrides: Sequence[str] = (), progress: bool = True) -> dict[str, Any]:
    """The quickstart's step 2: write `train_images` fine-tuning scenes as a rows folder
    (`output_dir/data/<concept>-train`, kept for the next run) and train the `tiny_lora` recipe on them from `base`
    into `output_dir/run` (resumed when stopped; a finished run is not trained again). Returns `run_training`'s
    summary plus `rows` and `token_ids`."""
    from .data.rows import write_rows_folder
    from .training.trainer import run_training

    output_dir = Path(output_dir)
    rows = output_dir / "data" / f"{concept}-train"
    token_ids = concept_token_ids(tokenizer, concept)
    overrides = [f"seed={seed}", *overrides] + ([f"training.max_steps={steps}"] if steps is not None else [])
    recipe = finetune_recipe(base, rows, token_ids, overrides)
    if progress:
        print(f"fine-tuning on {concept!r} (tokens {token_ids}, never seen in pretraining): LoRA "
              f"r={recipe['lora']['r']}, {recipe['training']['max_steps']} steps, data {rows}", flush=True)
    if not rows.exists():
        write_rows_folder(finetune_scenes(train_images, seed=seed, concept=concept), rows, progress=progress)
    result = run_training(recipe, output_dir=str(output_dir / "run"), resume=None)
    return {**result, "rows": str(rows), "token_ids": token_ids}


def evaluate_scenes(model, processor, dataset, batch_size: int = 8, progress: bool = True) -> dict[str, Any]:
    """`evaluate_dataset` in fast mode (the paper's protocol), in this process (the sets are small):
    `{"metrics": {...}, "metrics_by_category": {...}}`."""
    import torch

    from .evaluation.evaluate import evaluate_dataset

    with torch.inference_mode():
        result = evaluate_dataset(model, processor, dataset, mode="fast", batch_size=batch_size, num_workers=0,
                                  progress=progress)
    return {"metrics": result["metrics"], "metrics_by_category": result.get("metrics_by_category", {})}


def recorded_metrics(model, processor) -> dict[str, Any]:
    """The metrics of the fixed small held-out set `RECORDED_SET` (what the shipped folder records)."""
    import transformers

    dataset = heldout_scenes(RECORDED_SET["num_images"], seed=RECORDED_SET["seed"], split=RECORDED_SET["split"])
    # transformers' version: another release may order the attention sums differently and move a boundary pixel.
    return {"set": dict(RECORDED_SET), "transformers": transformers.__version__,
            **evaluate_scenes(model, processor, dataset, progress=False)}


def read_recorded_metrics(folder: str | Path | None = None) -> dict[str, Any]:
    folder = Path(folder) if folder is not None else tiny_base_path()
    return json.loads((folder / RECORDED_METRICS_FILE).read_text(encoding="utf-8"))


def before_after_table(concept: str, before_old: dict, after_old: dict, before_new: dict, after_new: dict) -> list[str]:
    """Markdown rows: the new concept, each old category and all old expressions, before -> after the fine-tune
    (cIoU and Prec@0.5; N-acc for no-target expressions, whose cIoU is not defined)."""
    def show(m, key):
        return f"{m[key]:.3f}" if isinstance(m.get(key), float) else "-"

    rows = [(f"new concept ({concept})", before_new["metrics"], after_new["metrics"])]
    rows += [(f"old: {name}", before_old["metrics_by_category"].get(name, {}),
              after_old["metrics_by_category"].get(name, {})) for name in before_old["metrics_by_category"]]
    rows.append(("old: all", before_old["metrics"], after_old["metrics"]))
    lines = ["| expressions | n | cIoU before | cIoU after | Prec@0.5 before | Prec@0.5 after | N-acc before | N-acc after |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, b, a in rows:
        n = a.get("n_expressions", b.get("n_expressions", "-"))
        no_target = name.endswith("no_target")
        cells = [("-", "-") if no_target else (show(b, "cIoU"), show(a, "cIoU")),
                 ("-", "-") if no_target else (show(b, "prec@0.5"), show(a, "prec@0.5")),
                 (show(b, "N-acc"), show(a, "N-acc"))]
        lines.append(f"| {name} | {n} | " + " | ".join(x for pair in cells for x in pair) + " |")
    return lines


def format_metrics(metrics: dict[str, Any], keys: Sequence[str] = METRIC_KEYS) -> str:
    return ", ".join(f"{k} {metrics[k]:.3f}" for k in keys if isinstance(metrics.get(k), float))


__all__ = ["tiny_base_path", "heldout_scenes", "finetune_scenes", "concept_token_ids", "finetune_recipe",
           "finetune_on_concept", "before_after_table", "FinerCategories",
           "evaluate_scenes", "recorded_metrics", "read_recorded_metrics", "format_metrics", "NEW_CONCEPT",
           "TINY_BASE_DIR", "RECORDED_METRICS_FILE", "RECORDED_SET"]

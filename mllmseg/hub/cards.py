"""Model cards for MLLMSeg releases: metric labels and tables, `model-index` entries, and the rendered README.

The card template lives in ``hub_cards/mllmseg.md`` (Jinja, rendered by ``huggingface_hub.ModelCard.from_template``
with a ``ModelCardData`` whose ``eval_results`` become the Hub ``model-index``).

Hub metadata choices:

* ``pipeline_tag: image-segmentation``: what the model is scored on (masks, cIoU/gIoU) and what people filter for
  when looking for a referring segmentation model. ``image-text-to-text`` would describe the chat side, which is
  the unchanged InternVL behaviour; it is kept as a tag. Saved checkpoints register a custom ``image-segmentation``
  pipeline (``pipeline_mllmseg.py``), so ``transformers.pipeline("image-segmentation", model=repo,
  trust_remote_code=True)`` works with ``expressions=``; the Hub's inference widget cannot pass expressions and is off.
* ``library_name: transformers`` (remote code, loaded with ``trust_remote_code=True``).
* metric values in the card and in ``model-index`` are fractions in [0, 1] (three decimals), as `mllmseg evaluate`,
  the quickstart and the README report them (0.750 = 75%).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

from ..remote_code.compat_mllmseg import SUPPORTED_TRANSFORMERS

# (key in evaluate_dataset()["metrics"], label in tables, model-index metric type)
METRICS: list[tuple[str, str, str]] = [
    ("cIoU", "cIoU", "ciou"),
    ("gIoU_per_expression", "gIoU (mean over expressions, LISA)", "giou_per_expression"),
    ("gIoU_per_image", "gIoU (mean over images, MLLMSeg ref.)", "giou_per_image"),
    ("prec@0.5", "Prec@0.5 (REC)", "precision_at_0.5"),
    ("N-acc", "N-acc (no-target)", "n_acc"),
    ("T-acc", "T-acc (targeted)", "t_acc"),
]

METRICS_NOTES = (
    "Metrics are fractions in [0, 1] (three decimals: 0.750 = 75%). **cIoU** = total intersection / total union over the split. "
    "**gIoU** is reported in both conventions in use: the mean of per-expression IoU (LISA) and the mean over images "
    "of the per-image mean IoU (the MLLMSeg reference evaluation). **Prec@0.5 (REC)**: the box of the predicted mask "
    "has IoU > 0.5 with the ground-truth box. **N-acc / T-acc** (GRES): share of no-target expressions answered "
    "with `[REJ]` / of targeted expressions answered with `[SEG]`. *fast* mode is the teacher-forced paper protocol, "
    "*generate* decodes freely."
)

# dataset name used by `mllmseg evaluate` -> (display name, Hub dataset id or None)
DATASETS: dict[str, tuple[str, str | None]] = {
    "refcoco": ("RefCOCO", "jxu124/refcoco"),
    "refcoco+": ("RefCOCO+", "jxu124/refcocoplus"),
    "refcocog": ("RefCOCOg", "jxu124/refcocog"),
    "refclef": ("RefCLEF", None),
    "grefcoco": ("gRefCOCO", None),
    "synthetic": ("Synthetic shapes (mllmseg)", None),
}

PIPELINE_TAG = "image-segmentation"
DEFAULT_LICENSE = "apache-2.0"
TEMPLATE_NAME = "mllmseg.md"


def template_path(name: str = TEMPLATE_NAME) -> Path:
    """The card template, shipped as package data in ``mllmseg/hub_cards``."""
    path = Path(__file__).resolve().parents[1] / "hub_cards" / name
    if not path.is_file():
        raise FileNotFoundError(f"model card template not found: {path}")
    return path


FRACTION_DECIMALS = 3


def _fraction(value) -> str:
    return "–" if value is None else f"{float(value):.{FRACTION_DECIMALS}f}"


def dataset_display(name: str) -> str:
    return DATASETS.get(name, (name, None))[0]


def split_text(split) -> str:
    if split is None:
        return "all"
    return split if isinstance(split, str) else "+".join(split)


def metrics_table(results: Sequence[dict]) -> str:
    """Markdown table, one row per evaluation (an `mllmseg evaluate` results JSON), metrics as fractions."""
    if not results:
        return "_No evaluation results were attached to this release._"
    header = ["Dataset", "Split", "Mode"] + [label for _, label, _ in METRICS] + ["Expressions"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * (len(METRICS) + 1)]
    for result in results:
        metrics = result["metrics"]
        row = [dataset_display(result.get("dataset", "?")), split_text(result.get("split")), result.get("mode", "fast")]
        row += [_fraction(metrics.get(key)) for key, _, _ in METRICS]
        row.append(str(metrics.get("n_expressions", "")))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def load_eval_results(paths: Iterable[str | Path]) -> list[dict]:
    """Read `mllmseg evaluate` results JSON files (each must hold a "metrics" dict)."""
    results = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"evaluation JSON not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
            raise ValueError(f"{path}: not an `mllmseg evaluate` results file (no 'metrics' object)")
        results.append(data)
    return results


def eval_results_for_index(results: Sequence[dict]) -> list:
    """`huggingface_hub.EvalResult` entries (fractions, three decimals) for the card's `model-index`."""
    from huggingface_hub import EvalResult

    entries = []
    for result in results:
        name = result.get("dataset", "unknown")
        display, hub_id = DATASETS.get(name, (name, None))
        split = split_text(result.get("split"))
        for key, label, metric_type in METRICS:
            value = result["metrics"].get(key)
            if value is None:
                continue
            entries.append(
                EvalResult(
                    task_type="image-segmentation",
                    task_name="Referring Expression Segmentation",
                    dataset_type=hub_id or name,
                    dataset_name=f"{display} {split}",
                    dataset_split=split,
                    metric_type=metric_type,
                    metric_name=label,
                    metric_value=round(float(value), FRACTION_DECIMALS),
                    metric_config=result.get("mode", "fast"),
                )
            )
    return entries


def _format_count(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit} ({n:,})"
    return f"{n:,}"


def _source_line(spec: dict) -> tuple[str, str | None]:
    """One `data.train:` source -> (card line, Hub dataset id or None)."""
    kind = spec.get("type")
    if kind == "refer":
        name = spec.get("dataset", "?")
        display, hub_id = DATASETS.get(name, (name, None))
        by = f", split by {spec['split_by']}" if spec.get("split_by") else ""
        return f"{display} ({split_text(spec.get('split', 'train'))}{by})", hub_id
    if kind == "grefcoco":
        return f"gRefCOCO ({split_text(spec.get('split', 'train'))})", None
    if kind == "hub":
        path = str(spec.get("path", "?"))
        hub_id = path if path.count("/") == 1 and not Path(path).exists() else None
        return f"`{hub_id or Path(path).name}` ({spec.get('hub_split', 'train')} split, RefCOCO schema)", hub_id
    if kind == "synthetic":
        count = spec.get("num_images")
        return DATASETS["synthetic"][0] + (f", {count:,} generated scenes" if isinstance(count, int) else ""), None
    return f"{kind} source", None


def training_sources(recipe: dict | None) -> list[dict]:
    specs = ((recipe or {}).get("data") or {}).get("train") or []
    return [specs] if isinstance(specs, dict) else list(specs)


def training_datasets(recipe: dict | None) -> list[str]:
    """Hub dataset ids of what the recipe trained on (the card's `datasets:` means training data)."""
    return sorted({hub_id for spec in training_sources(recipe) if (hub_id := _source_line(spec)[1])})


def _fine_tuning_line(recipe: dict, trainable: dict | None) -> str:
    lora = recipe.get("lora")
    if lora:
        text = (f"LoRA r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout', 0.0)} on the "
                "language model; the ViT and the projector frozen; the mask decoder trained")
    else:
        text = "full fine-tuning (no LoRA)"
    if trainable and trainable.get("all"):
        parts = ", ".join(f"{key} {value:,}" for key, value in trainable.items() if key not in ("trainable", "all") and value)
        text += f"; {trainable['trainable']:,} of {trainable['all']:,} parameters trained" + (f" ({parts})" if parts else "")
    return text


def training_section(summary: dict | None, notes: str = "") -> str:
    """The card's training section, from the run's own `train_summary.json` (written by `mllmseg train`) and/or
    the user's notes; says so when neither was given instead of describing a training that may not have happened."""
    lines: list[str] = []
    if summary:
        recipe = summary.get("recipe") or {}
        training = recipe.get("training") or {}
        loss = summary.get("train_loss")
        lines.append(
            f"Trained with `mllmseg train` (recipe `{recipe.get('name', 'unnamed')}`) for {summary.get('global_step', '?')} "
            "optimiser steps" + (f"; mean training loss {float(loss):.4f}." if loss is not None else ".")
        )
        lines.append("")
        sources = [_source_line(spec)[0] for spec in training_sources(recipe)]
        lines.append("* Training data: " + ("; ".join(sources) if sources else "not recorded"))
        if summary.get("base_model"):
            lines.append(f"* Started from: `{Path(str(summary['base_model'])).name}`")
        lines.append("* Fine-tuning: " + _fine_tuning_line(recipe, summary.get("trainable")))
        batch = training.get("per_device_train_batch_size")
        accumulation = training.get("gradient_accumulation_steps", 1)
        optimiser = [f"learning rate {training['learning_rate']}" if "learning_rate" in training else None,
                     f"{training['lr_scheduler_type']} schedule" if "lr_scheduler_type" in training else None,
                     f"warmup {training['warmup_steps']} steps" if training.get("warmup_steps") else None,
                     f"warmup {training['warmup_ratio']:.0%}" if training.get("warmup_ratio") else None,
                     f"weight decay {training['weight_decay']}" if "weight_decay" in training else None,
                     f"batch {batch} per device x {accumulation} accumulation" if batch else None]
        lines.append("* Optimiser: AdamW, " + ", ".join(item for item in optimiser if item))
        precision = "bf16" if training.get("bf16") else "fp16" if training.get("fp16") else "fp32"
        checkpointing = training.get("gradient_checkpointing") or training.get("activation_checkpointing")
        lines.append(f"* Precision: {precision}" + ("; gradient checkpointing" if checkpointing else ""))
    if notes.strip():
        lines += ([""] if lines else []) + [notes.strip()]
    if not lines:
        return ("_No training record came with this release (no `train_summary.json` next to the checkpoint, no "
                "`--training-notes`)._")
    return "\n".join(lines)


def build_model_card(
    repo_id: str,
    config: dict | None = None,
    eval_results: Sequence[dict] = (),
    base_model: str | None = None,
    license: str = DEFAULT_LICENSE,
    datasets: Sequence[str] | None = None,
    num_parameters: int | None = None,
    training_summary: dict | None = None,
    training_notes: str = "",
    template: str | Path | None = None,
):
    """Render the release README as a `huggingface_hub.ModelCard`.

    Args:
        repo_id: ``org/name`` the card is for (used in the usage snippet and as the model-index name).
        config: the checkpoint's ``config.json`` as a dict (model details in the card).
        eval_results: `mllmseg evaluate` results dicts; they fill the metrics table and the `model-index`.
        base_model: Hub id of the InternVL model it was fine-tuned from (metadata ``base_model``).
        datasets: Hub dataset ids of the training data for the metadata (on the Hub, `datasets:` means training
            data); default: the known ids of the sources in `training_summary`'s recipe, never the evaluation sets.
        training_summary: the run's ``train_summary.json`` (steps, loss, recipe), rendered as the training section.
        training_notes: free text added to the training section (``mllmseg release --training-notes FILE``).
    """
    from huggingface_hub import ModelCard, ModelCardData

    config = config or {}
    model_name = repo_id.split("/")[-1]
    if datasets is None:
        datasets = training_datasets((training_summary or {}).get("recipe"))
    text_config = config.get("text_config") or {}
    card_data = ModelCardData(
        language=["en"],
        license=license,
        library_name="transformers",
        pipeline_tag=PIPELINE_TAG,
        base_model=base_model,
        datasets=list(datasets) or None,
        tags=["mllmseg", "referring-expression-segmentation", "image-text-to-text", "internvl", "custom_code"],
        model_name=model_name,
        eval_results=eval_results_for_index(eval_results) or None,
        inference=False,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(template or template_path()),
        model_name=model_name,
        repo_id=repo_id,
        text_model_type=text_config.get("model_type", "unknown"),
        base_model_text=f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "not recorded",
        mask_head=str(config.get("mask_head", "dsff")).upper(),
        seg_tiling=config.get("seg_tiling", "single"),
        num_parameters=_format_count(num_parameters),
        metrics_table=metrics_table(eval_results),
        metrics_notes=METRICS_NOTES,
        training_section=training_section(training_summary, training_notes),
        transformers_range=SUPPORTED_TRANSFORMERS,
    )
    return card

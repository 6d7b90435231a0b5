"""Model cards for MLLMSeg releases: metric labels and tables, `model-index` entries, and the rendered README.

The card template lives in ``hub_cards/mllmseg.md`` (Jinja, rendered by ``huggingface_hub.ModelCard.from_template``
with a ``ModelCardData`` whose ``eval_results`` become the Hub ``model-index``).

Hub metadata choices:

* ``pipeline_tag: image-segmentation``: what the model is scored on (masks, cIoU/gIoU) and what people filter for
  when looking for a referring segmentation model. ``image-text-to-text`` would describe the chat side, which is
  the unchanged InternVL behaviour; it is kept as a tag. Neither tag makes ``transformers.pipeline`` work (the model
  is used through ``model.segment`` / ``model.chat``); the tag is for discovery and the inference widget is off.
* ``library_name: transformers`` (remote code, loaded with ``trust_remote_code=True``).
* metric values in the card and in ``model-index`` are percentages (two decimals), as the field reports them.
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
    "Metrics (percent; SPEC of the MLLMSeg package): **cIoU** = total intersection / total union over the split. "
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


def _pct(value) -> str:
    return "–" if value is None else f"{100.0 * float(value):.2f}"


def dataset_display(name: str) -> str:
    return DATASETS.get(name, (name, None))[0]


def split_text(split) -> str:
    if split is None:
        return "all"
    return split if isinstance(split, str) else "+".join(split)


def metrics_table(results: Sequence[dict]) -> str:
    """Markdown table, one row per evaluation (an `mllmseg evaluate` results JSON), metrics in percent."""
    if not results:
        return "_No evaluation results were attached to this release._"
    header = ["Dataset", "Split", "Mode"] + [label for _, label, _ in METRICS] + ["Expressions"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * (len(METRICS) + 1)]
    for result in results:
        metrics = result["metrics"]
        row = [dataset_display(result.get("dataset", "?")), split_text(result.get("split")), result.get("mode", "fast")]
        row += [_pct(metrics.get(key)) for key, _, _ in METRICS]
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
    """`huggingface_hub.EvalResult` entries (percent values) for the card's `model-index`."""
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
                    metric_value=round(100.0 * float(value), 2),
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


def build_model_card(
    repo_id: str,
    config: dict | None = None,
    eval_results: Sequence[dict] = (),
    base_model: str | None = None,
    license: str = DEFAULT_LICENSE,
    datasets: Sequence[str] | None = None,
    num_parameters: int | None = None,
    training_notes: str = "",
    template: str | Path | None = None,
):
    """Render the release README as a `huggingface_hub.ModelCard`.

    Args:
        repo_id: ``org/name`` the card is for (used in the usage snippet and as the model-index name).
        config: the checkpoint's ``config.json`` as a dict (model details in the card).
        eval_results: `mllmseg evaluate` results dicts; they fill the metrics table and the `model-index`.
        base_model: Hub id of the InternVL model it was fine-tuned from (metadata ``base_model``).
        datasets: Hub dataset ids for the metadata; default: the known ids of the evaluated datasets.
    """
    from huggingface_hub import ModelCard, ModelCardData

    config = config or {}
    model_name = repo_id.split("/")[-1]
    if datasets is None:
        datasets = sorted({DATASETS[r["dataset"]][1] for r in eval_results if DATASETS.get(r.get("dataset"), (0, None))[1]})
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
        training_notes=training_notes,
        transformers_range=SUPPORTED_TRANSFORMERS,
    )
    return card

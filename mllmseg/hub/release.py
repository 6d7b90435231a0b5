"""Hub releases of MLLMSeg checkpoints: assemble a self-contained remote-code folder, verify it, upload it once.

`push_to_hub` of the model and of the processor makes two commits and skips a local README (SPEC section 7), so a
release is one commit (`HfApi.create_commit`, see `upload_release`) of a folder that was first verified:

* weights are safetensors only, and no pickle file (``*.bin``, ``*.pt``, ``*.pth``, ``*.pkl``, ...) is anywhere in
  the checkpoint;
* every remote-code module named in an ``auto_map`` (config, processor, image processor, tokenizer) and everything
  those modules import through flat relative imports (``from .x import Y``) is present;
* a fresh ``python -I`` subprocess in which the ``mllmseg`` package cannot be imported loads the folder with
  ``AutoModel`` / ``AutoProcessor`` (``trust_remote_code=True``) with no missing, unexpected or mismatched keys.
"""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

# Non-weight, non-code files a release carries when the checkpoint has them.
RELEASE_FILES = (
    "config.json",
    "generation_config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "model.safetensors.index.json",
)
REQUIRED_FILES = ("config.json", "tokenizer_config.json")
AUTO_MAP_FILES = ("config.json", "processor_config.json", "preprocessor_config.json", "tokenizer_config.json")


class ReleaseError(ValueError):
    """A checkpoint that cannot be released as is (one-line message naming the file)."""


@dataclass
class ReleaseReport:
    folder: Path
    files: list[str]
    remote_code: list[str]
    skipped: list[str] = field(default_factory=list)
    verification: dict | None = None
    notes: list[str] = field(default_factory=list)  # what was checked / where the card's facts came from
    num_parameters: int | None = None  # the count the card states


# ----------------------------------------------------------------------------------------------------- checks


def find_pickles(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name.lower().endswith(PICKLE_SUFFIXES))


def check_no_pickles(folder: Path) -> None:
    pickles = find_pickles(folder)
    if pickles:
        raise ReleaseError(
            f"pickle file {pickles[0]} found: releases carry safetensors only (remove it"
            + (f" and {len(pickles) - 1} other pickle file(s)" if len(pickles) > 1 else "")
            + ")"
        )


def check_inside(folder: Path, names: Sequence[str]) -> None:
    """Every file a release takes is a regular file inside `folder`: no symlink (an upload would send its target)
    and no name (an index entry such as `../x.safetensors`) that resolves outside."""
    root = Path(folder).resolve()
    for name in names:
        path = Path(folder) / name
        if path.is_symlink():
            raise ReleaseError(f"{path} is a symbolic link: a release takes regular files only (copy the target in)")
        if root not in path.resolve().parents:
            raise ReleaseError(f"{name!r} resolves outside the checkpoint folder {folder}: refused")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ReleaseError(f"{path}: not valid JSON ({error})") from None


def weight_files(folder: Path) -> list[str]:
    """The safetensors files of a checkpoint (shards checked against the index when there is one)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        check_inside(folder, shards)
        for shard in shards:
            if not (folder / shard).is_file():
                raise ReleaseError(f"weight shard {folder / shard} (listed in {index.name}) is missing")
        if not shards:
            raise ReleaseError(f"{index}: empty weight_map")
        return shards
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise ReleaseError(f"no safetensors weights (*.safetensors) in {folder}")
    return files


def _auto_map_modules(folder: Path) -> dict[str, str]:
    """module file name -> the json file whose auto_map names it."""
    modules: dict[str, str] = {}

    def collect(auto_map, source):
        for value in (auto_map or {}).values():
            for ref in value if isinstance(value, (list, tuple)) else [value]:
                if not ref:
                    continue
                ref = ref.split("--", 1)[-1]  # "org/repo--module.Class"
                modules.setdefault(ref.rsplit(".", 1)[0] + ".py", source)

    for name in AUTO_MAP_FILES:
        path = folder / name
        if path.is_file():
            data = _read_json(path)
            collect(data.get("auto_map"), name)
            pipelines = data.get("custom_pipelines") or {}  # transformers' custom pipelines: {"task": {"impl": ...}}
            collect({task: entry.get("impl") for task, entry in pipelines.items() if isinstance(entry, dict)}, name)
            for sub in data.values():  # processor_config.json nests the image processor's config
                if isinstance(sub, dict):
                    collect(sub.get("auto_map"), name)
    return modules


def _relative_imports(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as error:
        raise ReleaseError(f"remote-code file {path} does not parse: {error.msg} (line {error.lineno})") from None
    targets = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            if node.level > 1 or (node.module and "." in node.module):
                raise ReleaseError(
                    f"remote-code file {path.name} line {node.lineno}: only flat relative imports "
                    "(`from .x import Y`) travel with a checkpoint"
                )
            names = [node.module] if node.module else [alias.name for alias in node.names]
            targets.extend(names)
    return targets


def remote_code_closure(folder: Path) -> list[str]:
    """Remote-code files the checkpoint needs: the auto_map modules and their relative-import closure.

    Raises ReleaseError naming the first missing file (and who needs it)."""
    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        raise ReleaseError(f"config.json not found in {folder}")
    wanted = _auto_map_modules(folder)
    if not _read_json(config).get("auto_map"):
        raise ReleaseError(f"{config} has no auto_map: not a remote-code (trust_remote_code) checkpoint")
    queue = [(name, f"the auto_map of {source}") for name, source in wanted.items()]
    seen: list[str] = []
    while queue:
        name, needed_by = queue.pop(0)
        if name in seen:
            continue
        path = folder / name
        if not path.is_file():
            raise ReleaseError(f"remote-code file {name} (needed by {needed_by}) is missing from {folder}")
        seen.append(name)
        queue.extend((target + ".py", name) for target in _relative_imports(path))
    return sorted(seen)


# ------------------------------------------------------------------------------------------------- assemble


def count_parameters(folder: Path) -> int:
    """Parameters of the checkpoint's model (`PreTrainedModel.num_parameters`: tied weights once, buffers such as
    BatchNorm statistics not counted), built on the meta device from its config: the number the verification's
    loaded model reports too, so the card and the command print one count."""
    import torch

    from ..remote_code.configuration_mllmseg import MLLMSegConfig
    from ..remote_code.modeling_mllmseg import MLLMSegForConditionalGeneration

    config = MLLMSegConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = MLLMSegForConditionalGeneration(config)
    return model.num_parameters()


# Published InternVL bases: name -> (language model type after conversion, LLM width, ViT width). From the model
# cards: 2.5-1B / 3-1B Qwen2.5-0.5B, 2.5-2B InternLM2.5-1.8B, 2.5-4B Qwen2.5-3B, 2.5-8B InternLM2.5-7B, 2.5-26B
# InternLM2.5-20B, 3-2B Qwen2.5-1.5B, 3-8B Qwen2.5-7B, 3-14B Qwen2.5-14B, 38B Qwen2.5-32B, 78B Qwen2.5-72B; the
# 26B and larger use InternViT-6B (width 3200), the others InternViT-300M (1024). InternLM2 converts to `llama`.
KNOWN_BASES: dict[str, tuple[str, int, int]] = {
    "InternVL2_5-1B": ("qwen2", 896, 1024), "InternVL2_5-2B": ("llama", 2048, 1024),
    "InternVL2_5-4B": ("qwen2", 2048, 1024), "InternVL2_5-8B": ("llama", 4096, 1024),
    "InternVL2_5-26B": ("llama", 6144, 3200), "InternVL2_5-38B": ("qwen2", 5120, 3200),
    "InternVL2_5-78B": ("qwen2", 8192, 3200), "InternVL3-1B": ("qwen2", 896, 1024),
    "InternVL3-2B": ("qwen2", 1536, 1024), "InternVL3-8B": ("qwen2", 3584, 1024),
    "InternVL3-14B": ("qwen2", 5120, 1024), "InternVL3-38B": ("qwen2", 5120, 3200),
    "InternVL3-78B": ("qwen2", 8192, 3200),
}


def check_base_model(base_model: str, config: dict) -> str:
    """Refuse a `--base-model` whose architecture is not the checkpoint's; returns a line saying what was checked.

    The base must be a Hub id (it becomes the card's `base_model:` metadata). A published InternVL (or an MLLMSeg
    release named after one, e.g. `MLLMSeg_InternVL2_5_8B_RES`) is compared by its known widths; others cannot be
    checked offline and are taken as given, which the returned line says."""
    if base_model.count("/") != 1 or Path(base_model).exists():
        raise ReleaseError(f"--base-model must be a Hub model id ORG/NAME, got {base_model!r}")
    match = re.search(r"InternVL(2_5|3)[-_](\d+)B(?![a-z0-9])", base_model.split("/")[1], flags=re.IGNORECASE)
    known = KNOWN_BASES.get(f"InternVL{match.group(1)}-{match.group(2)}B") if match else None
    if known is None:
        return f"base model {base_model}: not a known InternVL release, its architecture was not checked"
    text, vision = config.get("text_config") or {}, config.get("vision_config") or {}
    ours = (text.get("model_type"), text.get("hidden_size"), vision.get("hidden_size"))
    if ours != known:
        raise ReleaseError(
            f"--base-model {base_model} is a {known[0]} model of width {known[1]} with a ViT of width {known[2]}, "
            f"but the checkpoint is {ours[0]} of width {ours[1]} with a ViT of width {ours[2]}: not its base"
        )
    return f"base model {base_model}: architecture matches ({known[0]}, width {known[1]}, ViT width {known[2]})"


def find_training_summary(model_dir: Path) -> Path | None:
    """The `train_summary.json` of the run that wrote `model_dir`: in the folder itself, or in its parent when that
    summary's `final` is this folder (`mllmseg train` writes `<run>/train_summary.json` and `<run>/final/`)."""
    model_dir = Path(model_dir).resolve()
    if (model_dir / "train_summary.json").is_file():
        return model_dir / "train_summary.json"
    parent = model_dir.parent / "train_summary.json"
    if parent.is_file():
        final = _read_json(parent).get("final")
        # `final` is the path the run was given (relative to the folder it ran in, or absolute), so from another
        # folder it may resolve elsewhere: beside this summary, a folder of that name is the run's.
        if final and model_dir in ((model_dir.parent / final).resolve(), Path(final).resolve(),
                                   (model_dir.parent / Path(final).name).resolve()):
            return parent
    return None


def _place(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # weights can be large: a hard link when the filesystem allows it
    except OSError:
        shutil.copy2(src, dst)


def assemble_release(
    model_dir: str | Path,
    output_dir: str | Path,
    repo_id: str,
    eval_results: Sequence[dict] = (),
    base_model: str | None = None,
    license: str | None = None,
    datasets: Sequence[str] | None = None,
    training_summary: str | Path | None = None,
    training_notes: str = "",
) -> ReleaseReport:
    """Check `model_dir` and build the release folder `output_dir` (must be absent or empty) with a README card.

    The card's training section comes from `training_summary` (default: `find_training_summary(model_dir)`) and
    `training_notes`; `base_model` is checked against the checkpoint's architecture (`check_base_model`)."""
    from .cards import DEFAULT_LICENSE, build_model_card

    model_dir, output_dir = Path(model_dir), Path(output_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder not found: {model_dir}")
    check_no_pickles(model_dir)
    weights = weight_files(model_dir)
    for name in REQUIRED_FILES:
        if not (model_dir / name).is_file():
            raise ReleaseError(f"{name} not found in {model_dir}")
    code = remote_code_closure(model_dir)
    extras = [name for name in RELEASE_FILES if (model_dir / name).is_file()]
    files = sorted(set(weights) | set(code) | set(extras))
    check_inside(model_dir, files)
    skipped = sorted(
        str(p.relative_to(model_dir)) for p in model_dir.rglob("*") if p.is_file() and p.name not in files
    )
    config = _read_json(model_dir / "config.json")
    notes = [check_base_model(base_model, config)] if base_model else []
    summary_path = Path(training_summary) if training_summary else find_training_summary(model_dir)
    if training_summary and not summary_path.is_file():
        raise FileNotFoundError(f"training summary not found: {summary_path}")
    summary = _read_json(summary_path) if summary_path else None
    if summary is not None and not isinstance(summary.get("recipe"), dict):
        raise ReleaseError(f"{summary_path}: not an `mllmseg train` summary (no 'recipe' object)")
    notes.append(f"training section: {summary_path}" if summary_path else
                 "training section: no train_summary.json found" + (", from --training-notes" if training_notes else ""))
    num_parameters = count_parameters(model_dir)
    card = build_model_card(
        repo_id,
        config=config,
        eval_results=eval_results,
        base_model=base_model,
        license=license or DEFAULT_LICENSE,
        datasets=datasets,
        num_parameters=num_parameters,
        training_summary=summary,
        training_notes=training_notes,
    )
    if output_dir.exists() and any(output_dir.iterdir()):
        raise ReleaseError(f"release folder {output_dir} exists and is not empty")
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in files:
        _place(model_dir / name, output_dir / name)
    card.save(output_dir / "README.md")
    return ReleaseReport(output_dir, sorted(files + ["README.md"]), code, skipped, notes=notes,
                         num_parameters=num_parameters)


# --------------------------------------------------------------------------------------------------- verify

_VERIFY_SCRIPT = r"""
import json, sys
sys.modules["mllmseg"] = None  # the package must not be importable: everything has to come from the folder
folder = sys.argv[1]
from transformers import AutoModel, AutoProcessor
model, info = AutoModel.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
leaked = sorted(m for m, v in sys.modules.items() if v is not None and m.split(".")[0] == "mllmseg")
out = {
    "model_class": type(model).__module__ + "." + type(model).__qualname__,
    "processor_class": type(processor).__module__ + "." + type(processor).__qualname__,
    "missing_keys": sorted(map(str, info.get("missing_keys", []))),
    "unexpected_keys": sorted(map(str, info.get("unexpected_keys", []))),
    "mismatched_keys": sorted(map(str, info.get("mismatched_keys", []))),
    "error_msgs": [str(e) for e in info.get("error_msgs", [])],
    "has_segment": callable(getattr(model, "segment", None)),
    "has_chat": callable(getattr(model, "chat", None)),
    "processor_has_image_processor": getattr(processor, "image_processor", None) is not None,
    "mllmseg_modules": leaked,
    "num_parameters": model.num_parameters(),
}
print("MLLMSEG_VERIFY " + json.dumps(out))
"""


def verify_release(folder: str | Path, timeout: float = 1800) -> dict:
    """Verify a release folder; returns the loader's report, raises ReleaseError on any problem."""
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"release folder not found: {folder}")
    check_no_pickles(folder)
    weight_files(folder)
    remote_code_closure(folder)
    if not (folder / "README.md").is_file():
        raise ReleaseError(f"README.md (model card) missing from {folder}")
    with tempfile.TemporaryDirectory(prefix="mllmseg-verify-") as modules_cache:
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=modules_cache, TRANSFORMERS_VERBOSITY="error")
        proc = subprocess.run(
            [sys.executable, "-I", "-c", _VERIFY_SCRIPT, str(folder)],
            env=env, capture_output=True, text=True, timeout=timeout, cwd=modules_cache,
        )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("MLLMSEG_VERIFY ")]
    if proc.returncode != 0 or not lines:
        tail = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()]
        raise ReleaseError(
            f"loading {folder} with AutoModel/AutoProcessor(trust_remote_code=True) in a fresh interpreter failed: "
            + (tail[-1] if tail else f"exit code {proc.returncode}")
        )
    report = json.loads(lines[-1][len("MLLMSEG_VERIFY "):])
    problems = []
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        if report[key]:
            problems.append(f"{key.replace('_', ' ')}: {', '.join(report[key][:5])}"
                            + (" ..." if len(report[key]) > 5 else ""))
    if report["mllmseg_modules"]:
        problems.append(f"the checkpoint imported the mllmseg package ({report['mllmseg_modules'][0]})")
    if not report["processor_has_image_processor"]:
        problems.append(f"AutoProcessor returned {report['processor_class']} (no image processor)")
    if not (report["has_segment"] and report["has_chat"]):
        problems.append(f"{report['model_class']} lacks segment()/chat()")
    if problems:
        raise ReleaseError(f"verification of {folder} failed: " + "; ".join(problems))
    return report


# --------------------------------------------------------------------------------------------------- upload


def upload_release(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    create_pr: bool = False,
    commit_message: str | None = None,
    commit_description: str | None = None,
    token: str | None = None,
    revision: str | None = None,
):
    """Create the repo if needed (``private`` applies to a new repo) and upload `folder` in ONE commit.

    The commit is made with `HfApi.create_commit` on the folder's files. `HfApi.upload_folder` is not used: in
    huggingface_hub 2.x, with `hf_xet` installed, it streams large folders in several commits (a new one at least
    every 5 minutes, "(part N)"), and a multi-GB checkpoint would land in the repo (or the PR) in pieces.
    Returns the `huggingface_hub.CommitInfo` (``pr_url`` set with ``create_pr``)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    operations = [
        CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    ]
    if not operations:
        raise ReleaseError(f"release folder {folder} is empty")
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=True if private else None, exist_ok=True)
    return api.create_commit(
        repo_id=repo_id,
        operations=operations,
        repo_type="model",
        commit_message=commit_message or f"Release {repo_id.split('/')[-1]} (MLLMSeg)",
        commit_description=commit_description,
        create_pr=create_pr,
        revision=revision,
    )

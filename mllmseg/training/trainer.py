"""Training MLLMSeg with the Hugging Face `Trainer` (SPEC section 4).

The model computes its own loss (`lm_loss_weight * CE + BCE + Dice`); the Trainer here adds:

* a non-finite-loss guard: training stops with `NonFiniteLossError` naming the optimizer step;
* atomic checkpoints: each `checkpoint-N` is written under `<output_dir>/.staging/` and renamed into place once
  complete, so an interrupted save never leaves a half-written `checkpoint-N` that `resume_from_checkpoint=True`
  would pick; a save that fails (disk full) raises `CheckpointSaveError`, one line naming the folder, the free space
  and the last complete checkpoint;
* `lm_loss` / `mask_loss` in the logs, the loss logged at every save and at the last step (so the log history kept
  in each checkpoint covers every step, and `train_summary.json`'s loss is the whole run's across resumes), and the
  conversation dataset's epoch advanced at each epoch.

`run_training(recipe)` builds everything from a recipe (see `mllmseg/recipes/*.yaml`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, sort_checkpoints

from ..data.records import check_on_bad_record, skipped_records
from ..remote_code.compat_mllmseg import training_checkpointing_fields
from .collator import MLLMSegCollator
from .dataset import ConversationDataset

logger = logging.getLogger(__name__)

STAGING_DIR = ".staging"
BASE_MODEL_DIR = "base-model"
FINAL_DIR = "final"
SKIPPED_EXAMPLES = 20  # messages of skipped records kept in train_summary.json (the count is always there)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class CheckpointSaveError(OSError):
    """A checkpoint or the final model could not be written (disk full, file size limit, I/O error)."""


def _is_write_failure(error: BaseException) -> bool:
    """Errors a failed write surfaces as: `OSError` (ENOSPC, EFBIG...), safetensors' `SafetensorError` ("Error while
    serializing: I/O error ...") and torch.save's zip writer (`RuntimeError: [enforce fail at inline_container.cc]`,
    which does not pass the errno on)."""
    from safetensors import SafetensorError

    if isinstance(error, (OSError, SafetensorError)):
        return True
    return isinstance(error, RuntimeError) and any(
        text in str(error) for text in ("inline_container", "PytorchStreamWriter", "file write failed"))


def _free_space(folder: str) -> str:
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "unknown"
    return f"{free / 2**30:.2f} GiB" if free >= 2**30 else f"{free / 2**20:.1f} MiB"


def _save_failed(error: BaseException, name: str, run_dir: str, staged: str) -> CheckpointSaveError:
    """Removes the half-written `staged` folder and returns the one-line error for the failed save of `name`."""
    shutil.rmtree(staged, ignore_errors=True)
    try:
        os.rmdir(os.path.dirname(staged))
    except OSError:
        pass
    last = get_last_checkpoint(run_dir) if os.path.isdir(run_dir) else None
    then = (f"the last complete checkpoint, {last}, is untouched: free some space and run the same command again to "
            "resume from it" if last else "no complete checkpoint was written before")
    reason = " ".join(str(error).split()) or type(error).__name__
    return CheckpointSaveError(f"could not save {name} in {run_dir}: {type(error).__name__}: {reason} (free space "
                               f"there: {_free_space(run_dir)}); {then}")


class LogAtSaveCallback(TrainerCallback):
    """Logs the loss at every save and at the last step, so the log history covers every step: a checkpoint's
    `trainer_state.json` then holds the loss of every step before it, and a resumed run's history has no gap."""

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save or state.global_step >= state.max_steps:
            control.should_log = True


def loss_over_run(log_history: list[dict]) -> dict[str, Any]:
    """The run's loss from the Trainer's log history: ``train_loss`` (mean over the logged steps, each logged value
    weighted by the steps it averages), ``last_loss`` (the last logged value) and ``loss_steps`` (steps covered).

    On resume the Trainer restores the history from the checkpoint's `trainer_state.json`, so after any number of
    resumes this covers the whole run, not only the last process (`TrainOutput.training_loss` covers the latter).
    """
    total, covered, previous, last = 0.0, 0, 0, None
    for entry in log_history:
        if "loss" not in entry or int(entry.get("step", 0)) <= previous:
            continue
        step = int(entry["step"])
        total += float(entry["loss"]) * (step - previous)
        covered += step - previous
        previous, last = step, float(entry["loss"])
    return {"train_loss": total / covered if covered else None, "last_loss": last, "loss_steps": covered}


class EpochCallback(TrainerCallback):
    """Gives the conversation dataset the current epoch, so its random prompt choices change per epoch."""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(int(state.epoch or 0))


class MLLMSegTrainer(Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The model's loss mixes a token-averaged CE with a per-mask average: let the Trainer scale it for gradient
        # accumulation instead of passing num_items_in_batch into the model.
        self.model_accepts_loss_kwargs = False
        self._part_losses: dict[str, list[torch.Tensor]] = {"lm_loss": [], "mask_loss": []}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        if outputs.loss is None:
            raise ValueError("the model returned no loss: the batch needs labels and/or masks")
        for key in self._part_losses:
            value = getattr(outputs, key, None)
            if value is not None:
                self._part_losses[key].append(value.detach().float())
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        bad = torch.tensor(float(not torch.isfinite(loss.detach()).all()), device=loss.device)
        if self.accelerator.num_processes > 1:  # every rank stops together
            bad = self.accelerator.reduce(bad, reduction="sum")
        if float(bad) > 0:
            raise NonFiniteLossError(
                f"non-finite training loss ({float(loss):.4g} on this process) at step {self.state.global_step + 1} "
                f"(epoch {self.state.epoch or 0:.2f}); stopping. Lower the learning rate, check the data, or resume "
                "from the last checkpoint."
            )
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            for key, values in self._part_losses.items():
                if values:
                    logs[key] = round(float(torch.stack(values).mean()), 4)
                values.clear()
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = os.path.join(run_dir, STAGING_DIR)
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        if self.args.should_save and os.path.exists(staged):
            shutil.rmtree(staged)
        self.accelerator.wait_for_everyone()
        original = self.args.output_dir
        self.args.output_dir = staging_root
        try:
            super()._save_checkpoint(model, trial)
        except Exception as error:
            if not _is_write_failure(error):
                raise
            raise _save_failed(error, name, run_dir, staged) from error
        finally:
            self.args.output_dir = original
        self.accelerator.wait_for_everyone()  # every rank's files (RNG states, sharded optimizer) are in
        if self.args.should_save:
            if os.path.isfile(os.path.join(staged, "adapter_config.json")):
                from .lora import finish_adapter_folder

                # As final/: the base relative to the checkpoint when inside the run, our card, not PEFT's template.
                finish_adapter_folder(staged, final, run_dir)
            if self.state.best_model_checkpoint == staged:
                self.state.best_model_checkpoint = final
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(staged, final)
            try:
                os.rmdir(staging_root)
            except OSError:
                pass
            fd = os.open(run_dir, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self._rotate_checkpoints_atomically(run_dir, staging_root)
        self.accelerator.wait_for_everyone()

    def _rotate_checkpoints_atomically(self, run_dir: str, staging_root: str) -> None:
        """transformers' `rotate_checkpoints` (keep the newest `save_total_limit`, the newest and the best), except
        that each old checkpoint is first renamed out of sight, so a kill during the deletion never leaves a
        half-deleted `checkpoint-N` behind."""
        limit = self.args.save_total_limit
        checkpoints = sort_checkpoints(run_dir)  # oldest first, by step
        if not limit or len(checkpoints) <= limit:
            return
        protected = {checkpoints[-1]}
        if self.state.best_model_checkpoint is not None:
            protected.add(str(Path(self.state.best_model_checkpoint)))
        surplus = len(checkpoints) - max(limit, len(protected))
        doomed = [c for c in checkpoints if c not in protected][: max(surplus, 0)]
        for path in doomed:
            trash = os.path.join(staging_root, f"{os.path.basename(path)}.deleting")
            os.makedirs(staging_root, exist_ok=True)
            if os.path.exists(trash):
                shutil.rmtree(trash)
            os.replace(path, trash)
            shutil.rmtree(trash)
        try:
            os.rmdir(staging_root)
        except OSError:
            pass


# ----------------------------------------------------------------------------------------------------------------
# Building from a recipe
# ----------------------------------------------------------------------------------------------------------------
def build_model_and_processor(model_cfg: dict[str, Any], seed: int = 0):
    """`model:` section -> (model, processor, base_path). Exactly one of `tiny`, `internvl`, `pretrained`."""
    from ..remote_code.processing_mllmseg import MLLMSegProcessor
    from ..tiny import build_tiny_model, build_tiny_tokenizer

    sources = [k for k in ("tiny", "internvl", "pretrained") if model_cfg.get(k) is not None]
    if len(sources) != 1:
        raise ValueError(f"the model section needs exactly one of tiny / internvl / pretrained, got {sources or 'none'}")
    dtype = getattr(torch, model_cfg.get("dtype", "float32"))
    system_message = model_cfg.get("system_message")
    base_path = None
    if model_cfg.get("tiny") is not None:
        tiny = dict(model_cfg["tiny"] or {})
        model, tokenizer = build_tiny_model(build_tiny_tokenizer(), seed=seed, **tiny)
        processor = MLLMSegProcessor.for_model_config(tokenizer, model.config, system_message=system_message)
    elif model_cfg.get("internvl") is not None:
        from ..base_checkpoint import from_internvl

        model, tokenizer = from_internvl(model_cfg["internvl"], **dict(model_cfg.get("config") or {}))
        # BOS: as the tokenizer family has it (InternLM2 yes, Qwen2 no) unless the recipe says otherwise.
        processor = MLLMSegProcessor.for_model_config(tokenizer, model.config, system_message=system_message,
                                                      bos_token_in_prompt=model_cfg.get("bos_token_in_prompt"))
    else:
        from ..remote_code.modeling_mllmseg import MLLMSegForConditionalGeneration

        base_path = str(model_cfg["pretrained"])
        model = MLLMSegForConditionalGeneration.from_pretrained(base_path, dtype=dtype)
        processor = MLLMSegProcessor.from_pretrained(base_path)
    model = model.to(dtype)
    return model, processor, base_path


def hub_samples(path: str, hub_split: str = "train", image_root: str | None = None, split=None, text_key: str = "sent",
                on_bad_record: str = "error"):
    """A `jxu124/refcoco`-schema dataset: a folder written by `Dataset.save_to_disk`, or a Hub id (downloaded by
    `datasets.load_dataset` only because the recipe names it; offline runs need it in the local cache)."""
    import datasets

    from ..data.hub_refcoco import HubRefCOCODataset

    if any((Path(path) / name).is_file() for name in ("dataset_info.json", "dataset_dict.json")):
        dataset = datasets.load_from_disk(path)
    else:
        dataset = datasets.load_dataset(path, split=hub_split)
    if isinstance(dataset, datasets.DatasetDict):
        if hub_split not in dataset:
            raise ValueError(f"{path}: no split {hub_split!r} (has {sorted(dataset)})")
        dataset = dataset[hub_split]
    return HubRefCOCODataset(dataset, image_root=image_root, split=split, text_key=text_key,
                             on_bad_record=on_bad_record, source=str(path))


def _data_source_loaders() -> dict[str, Any]:
    """`data.train` source type -> the loader its keys are passed to."""
    from ..data.refer import GRefCOCODataset, ReferDataset
    from ..data.synthetic import SyntheticReferringDataset

    from ..data.rows import ReferringRowsDataset

    return {"synthetic": SyntheticReferringDataset, "refer": ReferDataset, "grefcoco": GRefCOCODataset,
            "hub": hub_samples, "rows": ReferringRowsDataset}


def data_source_keys(kind: str) -> set[str] | None:
    """The keys a `data.train` source of type `kind` accepts (its loader's arguments); None for an unknown type."""
    import inspect

    from ..data.refer import ReferDataset

    loader = _data_source_loaders().get(kind)
    if loader is None:
        return None
    names = lambda fn: {n for n in inspect.signature(fn).parameters if n not in ("self", "kwargs")}  # noqa: E731
    keys = names(loader.__init__ if isinstance(loader, type) else loader)
    if kind == "grefcoco":  # passes the rest on to ReferDataset, whose `dataset` it fixes
        keys |= names(ReferDataset.__init__) - {"dataset"}
    return keys


def build_samples(specs, on_bad_record: str | None = None) -> Any:
    """`data.train:` list of sources -> one sequence of `ReferringSample`. `on_bad_record` ("error" / "skip", the
    recipe's `data.on_bad_record`) applies to the sources read from annotation files that do not set their own;
    what they skipped is in `skipped_records(samples)`."""
    if isinstance(specs, dict):
        specs = [specs]
    if on_bad_record is not None:
        check_on_bad_record(on_bad_record, "data.on_bad_record")
    loaders = _data_source_loaders()
    parts = []
    for k, spec in enumerate(specs):
        spec = dict(spec)
        kind = spec.pop("type", None)
        if kind not in loaders:
            raise ValueError(f"data.train source {k}: unknown type {kind!r} (synthetic, refer, grefcoco, hub, rows)")
        unknown = sorted(set(spec) - data_source_keys(kind))
        if unknown:
            raise ValueError(f"data.train source {k} ({kind}): unknown key(s) {unknown}; valid: "
                             f"{', '.join(sorted(data_source_keys(kind)))}")
        if kind == "synthetic":
            for key in ("image_size", "size_range"):
                if key in spec:
                    spec[key] = tuple(spec[key])
        elif on_bad_record is not None and "on_bad_record" in data_source_keys(kind):
            spec.setdefault("on_bad_record", on_bad_record)
        parts.append(loaders[kind](**spec))
    return parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)


def training_arguments(recipe: dict[str, Any], output_dir: str) -> TrainingArguments:
    kwargs = dict(recipe.get("training") or {})
    for key, value in list(kwargs.items()):
        if key.endswith("_strategy") and value is False:  # YAML reads a bare `no` as false
            kwargs[key] = "no"
    kwargs.setdefault("remove_unused_columns", False)
    # Recipes say `gradient_checkpointing` (or `activation_checkpointing`); pass it under the installed release's
    # names, with non-reentrant checkpointing by default (the LoRA base is frozen: reentrant checkpointing would see
    # no input that requires grad).
    flags = [kwargs.pop(name) for name in ("gradient_checkpointing", "activation_checkpointing") if name in kwargs]
    ckpt_kwargs = [kwargs.pop(n) for n in ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs") if n in kwargs]
    if any(flags):
        flag_field, kwargs_field = training_checkpointing_fields(TrainingArguments)
        kwargs[flag_field] = True
        kwargs[kwargs_field] = next((k for k in ckpt_kwargs if k), None) or {"use_reentrant": False}
    deepspeed = kwargs.get("deepspeed")
    if isinstance(deepspeed, str) and not os.path.isfile(deepspeed):
        from .recipes import RECIPE_DIR

        builtin = RECIPE_DIR / deepspeed
        if not builtin.is_file():
            raise FileNotFoundError(f"DeepSpeed config {deepspeed} not found (built-in: zero1.json, zero2.json)")
        kwargs["deepspeed"] = str(builtin)
    if kwargs["remove_unused_columns"]:
        raise ValueError("training.remove_unused_columns must stay false (the collator builds the model inputs)")
    if "warmup_ratio" in kwargs and "warmup_ratio" not in {f.name for f in dataclasses.fields(TrainingArguments)}:
        # transformers 5 dropped `warmup_ratio`: a float `warmup_steps` below 1 is the ratio of the run instead.
        ratio = kwargs.pop("warmup_ratio")
        if kwargs.get("warmup_steps"):
            raise ValueError("set training.warmup_steps or training.warmup_ratio, not both")
        if not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise ValueError(f"training.warmup_ratio must be a number in [0, 1), got {ratio!r}")
        kwargs["warmup_steps"] = float(ratio)
    kwargs.setdefault("report_to", "none")
    kwargs.setdefault("seed", int(recipe.get("seed", 0)))
    if not torch.cuda.is_available():
        kwargs.setdefault("use_cpu", True)
    return TrainingArguments(output_dir=output_dir, **kwargs)


def build_trainer(recipe: dict[str, Any], output_dir: str | None = None, callbacks=None, train_dataset=None):
    """Everything `run_training` needs: (trainer, processor, info).

    `train_dataset` (a sequence of `ReferringSample`, e.g. `ReferringRowsDataset(my_datasets_dataset)` or any
    built-in loader) replaces the recipe's `data.train` sources; the rest of `data:` (max_expressions, tiling,
    jpeg_prob, ...) still applies."""
    from .lora import LoraRecipe, apply_lora, trainable_parameter_counts

    output_dir = str(output_dir or recipe.get("output_dir") or "outputs/" + str(recipe.get("name", "run")))
    seed = int(recipe.get("seed", 0))
    args = training_arguments(recipe, output_dir)
    check_sharding_is_possible(args)
    _warn_about_settings(args)
    data_cfg = dict(recipe.get("data") or {})
    if train_dataset is not None:
        samples = check_train_dataset(train_dataset)
    elif "train" not in data_cfg:
        raise ValueError("the recipe has no data.train section (or pass train_dataset=...)")
    else:
        # The data first: a bad annotation file stops the run before the model is built.
        samples = build_samples(data_cfg["train"], on_bad_record=data_cfg.get("on_bad_record", "error"))
    skipped = skipped_records(samples)
    if skipped and args.process_index == 0:
        logger.warning(f"skipped {len(skipped)} bad records (data.on_bad_record: skip); the first: {skipped[0]}")
    model, processor, base_path = build_model_and_processor(dict(recipe.get("model") or {}), seed=seed)
    lora_cfg = recipe.get("lora")
    if lora_cfg:
        if base_path is None:
            # The adapter needs a base to load onto: the model as it starts (new token rows, decoder init).
            base_path = os.path.join(output_dir, BASE_MODEL_DIR)
            if args.should_save and not os.path.exists(os.path.join(base_path, "config.json")):
                model.save_pretrained(base_path)
                processor.save_pretrained(base_path)
        model = apply_lora(model, LoraRecipe(**lora_cfg))
        model.peft_config["default"].base_model_name_or_path = os.path.abspath(base_path)
    train_dataset = ConversationDataset(
        samples,
        seed=seed,
        max_expressions=int(data_cfg.get("max_expressions", 5)),
        jpeg_prob=float(data_cfg.get("jpeg_prob", 0.0)),
        eval_prompt_prob=float(data_cfg.get("eval_prompt_prob", 0.0)),
    )
    collator = MLLMSegCollator(processor, tiling=data_cfg.get("tiling", "single"), max_length=data_cfg.get("max_length"))
    trainer = MLLMSegTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=collator,
        processing_class=processor,
        callbacks=[EpochCallback(train_dataset), LogAtSaveCallback(), *(callbacks or [])],
    )
    info = {"output_dir": output_dir, "base_model": base_path, "trainable": trainable_parameter_counts(model),
            "skipped": skipped}
    return trainer, processor, info


def check_train_dataset(dataset):
    """A user's `train_dataset`: a non-empty sequence (`len` + indexing) whose items are `ReferringSample`s."""
    from ..data.records import ReferringSample

    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise TypeError(f"train_dataset must be a sequence of ReferringSample (len() and [i]), got "
                        f"{type(dataset).__name__}; wrap rows with mllmseg.data.rows.ReferringRowsDataset")
    if len(dataset) == 0:
        raise ValueError("train_dataset is empty")
    first = dataset[0]
    if not isinstance(first, ReferringSample):
        raise TypeError(f"train_dataset[0] must be a ReferringSample, got {type(first).__name__}; wrap rows of "
                        "image / expression / mask with mllmseg.data.rows.ReferringRowsDataset")
    return dataset


def fsdp_requested(args: TrainingArguments) -> bool:
    """FSDP asked for through `training.fsdp` or accelerate's launcher (`accelerate launch --use_fsdp`)."""
    return bool(args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def check_sharding_is_possible(args: TrainingArguments) -> None:
    """Refuse FSDP where accelerate would not enable it. accelerate (1.15, `AcceleratorState`) turns FSDP on only
    for multi-process runs on an accelerator (GPU, NPU, XPU, ...); on CPU processes (gloo) it keeps plain DDP without
    a word, so every process would hold the whole model while the user believes it sharded."""
    if not fsdp_requested(args):
        return
    from accelerate.utils import DistributedType

    state = args.distributed_state  # set up by TrainingArguments (torchrun / accelerate launch environment)
    if state is not None and state.distributed_type in (DistributedType.MULTI_CPU, DistributedType.NO):
        raise ValueError(
            f"FSDP was requested (training.fsdp={args.fsdp!r}, ACCELERATE_USE_FSDP="
            f"{os.environ.get('ACCELERATE_USE_FSDP', 'unset')}) but this run is {state.distributed_type.value} with "
            f"{state.num_processes} process(es) on {state.device}: accelerate enables FSDP only for several processes "
            "on GPUs (or other accelerators), so it would silently train plain DDP here. Drop the FSDP setting "
            "(torchrun runs DDP on CPU) or run on GPUs."
        )


def _warn_about_settings(args: TrainingArguments) -> None:
    """One warning line for settings that run but cannot do what they say."""
    if args.process_index != 0 or args.max_steps <= 0:
        return
    warmup = args.get_warmup_steps(args.max_steps)
    if warmup >= args.max_steps:
        logger.warning(f"training.warmup_steps ({warmup}) is not shorter than the run (training.max_steps "
                       f"{args.max_steps}): the learning rate never reaches training.learning_rate "
                       f"({args.learning_rate:g})")


def save_final(trainer, processor, output_dir: str) -> str:
    """Final weights to `<output_dir>/final`: a remote-code checkpoint (full fine-tuning) or a LoRA adapter, both
    with the processor."""
    final = os.path.join(output_dir, FINAL_DIR)
    staged = os.path.join(output_dir, STAGING_DIR, FINAL_DIR)
    if trainer.args.should_save and os.path.exists(staged):
        shutil.rmtree(staged)
    try:
        trainer.save_model(staged)
        if trainer.args.should_save:
            processor.save_pretrained(staged)
            if os.path.isfile(os.path.join(staged, "adapter_config.json")):  # LoRA: relative base path, our card
                from .lora import finish_adapter_folder

                finish_adapter_folder(staged, final, output_dir)
    except Exception as error:
        if not _is_write_failure(error):
            raise
        raise _save_failed(error, FINAL_DIR, output_dir, staged) from error
    if trainer.args.should_save:
        # The pickled TrainingArguments stay in the checkpoints; a final model folder carries no pickle file
        # (releases refuse them), and the arguments are in train_summary.json's recipe anyway.
        args_file = os.path.join(staged, "training_args.bin")
        if os.path.exists(args_file):
            os.remove(args_file)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(staged, final)  # a reader never sees a half-written final/
        try:
            os.rmdir(os.path.dirname(staged))
        except OSError:
            pass
    trainer.accelerator.wait_for_everyone()
    return final


def _remove_stale_trash(out: str) -> None:
    """A kill during checkpoint rotation can leave `.staging/checkpoint-N.deleting`; finish deleting it."""
    staging = Path(out, STAGING_DIR)
    for trash in staging.glob("*.deleting"):
        shutil.rmtree(trash, ignore_errors=True)


def _finished_summary(out: str, max_steps: int) -> dict | None:
    """The summary of a run that already reached `max_steps` with its `final/` saved, else None."""
    summary_path = Path(out, "train_summary.json")
    if max_steps is None or max_steps <= 0 or not summary_path.is_file() or not Path(out, FINAL_DIR).is_dir():
        return None
    summary = json.loads(summary_path.read_text())
    return summary if int(summary.get("global_step", -1)) >= max_steps else None


def run_training(recipe: dict[str, Any], output_dir: str | None = None, resume: bool | str | None = None,
                 callbacks=None, train_dataset=None) -> dict[str, Any]:
    """Train from a recipe; `resume=None` resumes when the output folder already holds a checkpoint. A run whose
    `final/` and summary already cover `max_steps` is not trained again: it says so and returns its summary.
    `train_dataset` (ReferringSample sequence) replaces the recipe's `data.train` (see `build_trainer`)."""
    trainer, processor, info = build_trainer(recipe, output_dir, callbacks=callbacks, train_dataset=train_dataset)
    out = info["output_dir"]
    if trainer.args.should_save:
        _remove_stale_trash(out)
    done = _finished_summary(out, trainer.args.max_steps)
    if done is not None:
        if trainer.is_world_process_zero():
            print(f"{out}: already trained to step {done['global_step']} (max_steps {trainer.args.max_steps}); "
                  f"{done['final']} is up to date, nothing to do. Use another --output-dir to train again.")
        return {**done, "trainer": trainer, "processor": processor}
    if resume is None:
        resume = os.path.isdir(out) and get_last_checkpoint(out) is not None
    resumed_from = (get_last_checkpoint(out) if resume is True else str(resume)) if resume else None
    if resume is True and resumed_from is None:
        raise FileNotFoundError(f"cannot resume: no checkpoint-N folder in {out}")
    if trainer.is_world_process_zero():
        t = info["trainable"]
        print(f"trainable parameters: {t['trainable']:,} of {t['all']:,} (" + ", ".join(f"{k} {v:,}" for k, v in t.items() if k not in ("trainable", "all") and v) + ")")
    trainer.train(resume_from_checkpoint=resumed_from)
    final = save_final(trainer, processor, out)
    # The loss over every step of the run, this process and those before a resume (TrainOutput.training_loss
    # covers this process only).
    summary = {"global_step": trainer.state.global_step, **loss_over_run(trainer.state.log_history),
               "resumed_from": resumed_from, "final": final, "base_model": info["base_model"],
               "trainable": info["trainable"], "skipped_records": len(info["skipped"]),
               "skipped_examples": info["skipped"][:SKIPPED_EXAMPLES], "recipe": recipe}
    if train_dataset is not None:  # what was trained on, not the recipe's sources it replaced
        data = dict(recipe.get("data") or {})
        data["train"] = [{"type": "python", "description": f"{type(train_dataset).__name__} of {len(train_dataset)} "
                          "samples passed as run_training(train_dataset=...)"}]
        summary["recipe"] = {**recipe, "data": data}
    if trainer.is_world_process_zero():
        tmp = Path(out, "train_summary.json.tmp")
        tmp.write_text(json.dumps(summary, indent=2, default=str))
        os.replace(tmp, Path(out, "train_summary.json"))
    return {**summary, "trainer": trainer, "processor": processor}


__all__ = [
    "MLLMSegTrainer",
    "NonFiniteLossError",
    "CheckpointSaveError",
    "loss_over_run",
    "EpochCallback",
    "build_trainer",
    "run_training",
    "save_final",
    "check_sharding_is_possible",
    "check_train_dataset",
    "STAGING_DIR",
]

# Copyright 2026 The mllmseg authors. Licensed under the Apache License, Version 2.0.
"""The one place where MLLMSeg's remote code meets the differences between transformers releases.

The remote code travels inside every checkpoint and runs under whatever transformers the user has, so:

* importing any remote-code file checks the installed transformers against the range CI proves
  (`SUPPORTED_TRANSFORMERS`) and refuses any other with one error naming both; releases before 5.18 would
  otherwise load and run with wrong numbers (their `InternVLModel.forward` swallows `mm_encoder_outputs` in
  `**kwargs`, so the LLM would read raw `<IMG_CONTEXT>` embeddings);
* names that were renamed inside the range are detected by feature (a forward's signature, the fields of
  transformers' own output classes), never by version number.

This file travels inside checkpoints as remote code: it imports only the standard library, torch, packaging
(a transformers dependency) and transformers.
"""
from __future__ import annotations

import dataclasses
import inspect

import transformers
from packaging.version import Version

# The transformers releases this remote code is tested on (CI runs the oldest and the newest of them).
MIN_TRANSFORMERS = "5.18.0"
BELOW_TRANSFORMERS = "6"
SUPPORTED_TRANSFORMERS = f">={MIN_TRANSFORMERS},<{BELOW_TRANSFORMERS}"


class UnsupportedTransformersError(ImportError):
    """The installed transformers is outside the range MLLMSeg's remote code supports (`.installed`, `.supported`)."""

    def __init__(self, installed: str, reason: str):
        self.installed, self.supported, self.reason = installed, SUPPORTED_TRANSFORMERS, reason
        super().__init__(
            f"MLLMSeg's remote code supports transformers {SUPPORTED_TRANSFORMERS}, but transformers {installed} is "
            f"installed ({reason}); install a supported release: pip install 'transformers{SUPPORTED_TRANSFORMERS}'"
        )


def _unsupported(reason: str, version: str | None = None) -> UnsupportedTransformersError:
    return UnsupportedTransformersError(version or transformers.__version__, reason)


def check_transformers(version: str | None = None) -> None:
    """Raise `UnsupportedTransformersError` when `version` (default: the installed one) is outside the range."""
    installed = Version(version or transformers.__version__)
    if installed.release < Version(MIN_TRANSFORMERS).release:
        raise _unsupported("too old", version)
    if installed.release >= Version(BELOW_TRANSFORMERS).release:
        raise _unsupported("a newer major release, not tested", version)


def _forward_parameters(cls) -> set[str]:
    return set(inspect.signature(cls.forward).parameters)


# The version first, so that a release too old to have what the imports below name fails with this error.
check_transformers()

from transformers.modeling_outputs import CausalLMOutputWithPast  # noqa: E402
from transformers.models.internvl.modeling_internvl import InternVLModel  # noqa: E402

if "mm_encoder_outputs" not in _forward_parameters(InternVLModel):
    # A pre-release or patched build in the range that lacks the feature everything here relies on.
    raise _unsupported("its InternVLModel.forward takes no mm_encoder_outputs")

# The KV cache's name: `past_key_values` up to 5.23, `cache` from 5.24 on (in forward keywords and in outputs).
CACHE_NAME = "cache" if "cache" in _forward_parameters(InternVLModel) else "past_key_values"
CACHE_NAMES = ("cache", "past_key_values")
if CACHE_NAME not in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}:
    raise _unsupported(f"its InternVLModel.forward takes {CACHE_NAME!r} but CausalLMOutputWithPast has no such field")


def pop_cache(kwargs: dict, past_key_values=None):
    """The cache passed to a forward under either name (`past_key_values=` or, from 5.24 on, `cache=`), removed
    from `kwargs`. Raises when it is given twice."""
    given = [c for c in (past_key_values, *(kwargs.pop(name, None) for name in CACHE_NAMES)) if c is not None]
    if len(given) > 1:
        raise ValueError("pass the cache once, as past_key_values or as cache, not both")
    return given[0] if given else None


def cache_kwargs(cache) -> dict:
    """`{name: cache}` under the installed transformers' name, for a forward call or an output constructor."""
    return {CACHE_NAME: cache}


def output_cache(outputs):
    """The cache of a transformers model output, under whichever name it has."""
    return getattr(outputs, CACHE_NAME, None)


def training_checkpointing_fields(training_arguments_cls) -> tuple[str, str]:
    """The `TrainingArguments` fields (flag, keywords) for activation checkpointing: `activation_checkpointing` /
    `activation_checkpointing_kwargs` from 5.24 on, where the old `gradient_checkpointing*` names are deprecated
    aliases read only at construction; `gradient_checkpointing` / `gradient_checkpointing_kwargs` before."""
    fields = {f.name for f in dataclasses.fields(training_arguments_cls)}
    prefix = "activation" if "activation_checkpointing_kwargs" in fields else "gradient"
    return f"{prefix}_checkpointing", f"{prefix}_checkpointing_kwargs"


def enable_activation_checkpointing(model, **checkpoint_kwargs) -> None:
    """Turn on activation (gradient) checkpointing on a `PreTrainedModel` with `torch.utils.checkpoint` keywords,
    through `activation_checkpointing_enable` (5.23 on) or `gradient_checkpointing_enable` (before)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs or None)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs or None)


def disable_activation_checkpointing(model) -> None:
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


__all__ = [
    "SUPPORTED_TRANSFORMERS",
    "MIN_TRANSFORMERS",
    "BELOW_TRANSFORMERS",
    "UnsupportedTransformersError",
    "check_transformers",
    "CACHE_NAME",
    "pop_cache",
    "cache_kwargs",
    "output_cache",
    "training_checkpointing_fields",
    "enable_activation_checkpointing",
    "disable_activation_checkpointing",
]

"""Evaluation batches, built in `DataLoader` workers while the model runs.

Shapes use: B = samples in a batch, E_b = expressions of sample b, (h_b, w_b) = its original size, N = tiles.

A worker reads its samples (`dataset[i]`: annotation decoding, polygon rasterising), opens their images, and turns
them into model-ready batches with the processor (tiling, normalising, the reference evaluation conversation,
tokenising, padding); the ground-truth masks travel with the batch as tensors, so the main process only moves
tensors to the model's device. Each worker takes `group_window` batches' worth of samples at a time and batches
them by tile count and prompt length, so that little of a batch is padding.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data.records import Referent, as_bool_mask

MODES = ("fast", "generate")


def default_num_workers(num_processes: int = 1) -> int:
    """Loader workers per process: the CPUs this process may use, shared by `num_processes` processes, less one for
    the process itself, at most 4 (0: load in the main process)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(0, min(4, cpus // max(1, num_processes) - 1))


@dataclass
class EvalBatch:
    """One model call's worth of samples.

    Attributes:
        inputs: the model's inputs: `input_ids` `(B, L)`, `attention_mask` `(B, L)` (right-padded in `fast` mode,
            left-padded prompts in `generate` mode), `pixel_values` `(N, 3, S, S)`, `tile_grids` `(B, 2)`.
        original_sizes: `(B, 2)` (h, w) per sample.
        gt_masks: per sample `(E_b, h_b, w_b)` bool ground truth.
        indices: the samples' positions in the dataset.
        image_ids: the samples' image ids.
        referents: per sample its referents, with `mask=None` (the masks are `gt_masks`).
    """

    inputs: dict[str, torch.Tensor]
    original_sizes: torch.Tensor
    gt_masks: list[torch.Tensor]
    indices: list[int]
    image_ids: list[Any]
    referents: list[list[Referent]]

    def pin_memory(self) -> "EvalBatch":
        """Page-locked copies of the tensors (`DataLoader(pin_memory=True)` calls this), for asynchronous copies."""
        return replace(self, inputs={k: v.pin_memory() for k, v in self.inputs.items()},
                       gt_masks=[m.pin_memory() for m in self.gt_masks])


class EvaluationCollator:
    """`collate_fn` of the evaluation loader: a list of `(position, ReferringSample)` -> a list of [`EvalBatch`].

    Args:
        processor: the model's processor.
        mode: `"fast"` (teacher-forced conversations, right-padded) or `"generate"` (questions, left-padded).
        tiling: `"single"` / `"dynamic"`, or None for the processor's default.
        batch_size: samples per batch.
        group_by_length: batch the samples by (tile count, prompt length) instead of in dataset order.
    """

    def __init__(self, processor, mode: str, tiling: str | None, batch_size: int, group_by_length: bool = False):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.processor, self.mode, self.tiling = processor, mode, tiling
        self.batch_size, self.group_by_length = batch_size, group_by_length

    def __call__(self, items: list[tuple[int, Any]]) -> list[EvalBatch]:
        prompts = [self.processor.segmentation_prompt([r.text for r in sample.referents]) for _, sample in items]
        order = list(range(len(items)))
        if self.group_by_length:
            order.sort(key=lambda k: self._length_key(items[k][1], prompts[k]))
        return [self._batch([items[k] for k in chunk], [prompts[k] for k in chunk])
                for chunk in (order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size))]

    def _length_key(self, sample, prompt) -> tuple[int, int]:
        """(tiles, characters of the conversation): what sets a sample's sequence length, known without tiling."""
        kwargs = {"tiling": self.tiling} if self.tiling else {}
        tiles = self.processor.image_processor.get_number_of_image_patches(sample.height, sample.width, kwargs)
        return tiles, len(prompt[0]) + (len(prompt[1]) if self.mode == "fast" else 0)

    def _batch(self, items, prompts) -> EvalBatch:
        samples = [sample for _, sample in items]
        if self.mode == "fast":
            encoded = self.processor(images=[s.image for s in samples], text=[q for q, _ in prompts],
                                     answers=[a for _, a in prompts], tiling=self.tiling)
        else:
            encoded = self.processor(images=[s.image for s in samples], text=[q for q, _ in prompts],
                                     tiling=self.tiling, padding_side="left")
        return EvalBatch(
            inputs={k: encoded[k] for k in ("input_ids", "attention_mask", "pixel_values", "tile_grids")},
            original_sizes=encoded["original_sizes"],
            gt_masks=[ground_truth(s) for s in samples],
            indices=[position for position, _ in items],
            image_ids=[s.image_id for s in samples],
            referents=[[replace(r, mask=None) for r in s.referents] for s in samples],
        )


def ground_truth(sample) -> torch.Tensor:
    """`(E, h, w)` bool: the sample's referent masks, stacked (an empty mask is a no-target)."""
    masks = [as_bool_mask(r.mask) for r in sample.referents]
    for k, mask in enumerate(masks):
        if mask.shape != (sample.height, sample.width):
            raise ValueError(f"sample {sample.image_id!r}, referent {k}: mask is {mask.shape}, expected "
                             f"{(sample.height, sample.width)} (the sample's height, width)")
    if not masks:
        return torch.zeros(0, sample.height, sample.width, dtype=torch.bool)
    return torch.from_numpy(np.stack(masks))


class _Positions(torch.utils.data.Dataset):
    """`(position, dataset[position])` for the given positions (this process's share)."""

    def __init__(self, dataset, positions: list[int]):
        self.dataset, self.positions = dataset, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, k: int):
        return self.positions[k], self.dataset[self.positions[k]]


def _single_thread_worker(_worker_id: int) -> None:
    # Workers share the CPUs with the model's process: one intra-op thread each (as torch's own default in workers,
    # made explicit so that an OMP_NUM_THREADS meant for the model does not multiply).
    torch.set_num_threads(1)


def evaluation_loader(dataset, positions: list[int], collator: EvaluationCollator, num_workers: int,
                      prefetch_factor: int = 2, group_window: int = 4, pin_memory: bool = False):
    """Iterator over the [`EvalBatch`]es of `dataset[positions]`.

    Each loader item is `group_window * batch_size` samples, grouped into batches in a worker; `prefetch_factor`
    items per worker are prepared ahead. `num_workers=0` builds them in this process, one at a time.
    """
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
    if isinstance(prefetch_factor, bool) or not isinstance(prefetch_factor, int) or prefetch_factor < 1:
        raise ValueError(f"prefetch_factor must be a positive integer, got {prefetch_factor!r}")
    loader = DataLoader(
        _Positions(dataset, positions),
        batch_size=collator.batch_size * (group_window if collator.group_by_length else 1),
        shuffle=False,
        collate_fn=collator,
        num_workers=num_workers,
        prefetch_factor=prefetch_factor if num_workers else None,
        worker_init_fn=_single_thread_worker if num_workers else None,
        pin_memory=pin_memory,
    )
    for batches in loader:
        yield from batches

"""Conversation dataset + collator: prompts, [REJ], labels, masks, mixed tile counts, a real forward."""
import numpy as np
import pytest
import torch

from mllmseg.data.records import Referent, ReferringSample
from mllmseg.data.synthetic import SyntheticReferringDataset
from mllmseg.remote_code.conversation_mllmseg import MAX_EXPRESSIONS_PER_SAMPLE, unmark
from mllmseg.tiny import build_processor, build_tiny_model
from mllmseg.training.collator import MLLMSegCollator
from mllmseg.training.dataset import ConversationDataset


@pytest.fixture(scope="module")
def tiny_setup():
    model, tokenizer = build_tiny_model(seed=0)
    return model, build_processor(tokenizer, model.config, system_message="")


def _sample(n_referents, empty=(), size=(60, 90), image_id=0):
    from PIL import Image

    h, w = size
    refs = []
    for k in range(n_referents):
        mask = np.zeros((h, w), bool)
        if k not in empty:
            mask[k : k + 10, 5 : 5 + 3 * (k + 1)] = True
        refs.append(Referent(text=f"thing {k}.", mask=mask, box=None, no_target=k in empty))
    return ReferringSample.from_image(image_id, Image.new("RGB", (w, h), (10 * n_referents, 80, 120)), refs)


def test_items_are_deterministic_per_seed_epoch_index():
    ds = ConversationDataset(SyntheticReferringDataset(4, image_size=(64, 64)), seed=3)
    a, b = ds[1], ds[1]
    assert (a["question"], a["answer"]) == (b["question"], b["answer"])
    answers = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        answers.add(ds[1]["answer"])
    assert len(answers) > 1  # templates / order change with the epoch


def test_at_most_five_expressions_and_rej_for_empty_masks():
    sample = _sample(8, empty=(2, 6))
    ds = ConversationDataset([sample], seed=0)
    for epoch in range(5):
        ds.set_epoch(epoch)
        item = ds[0]
        n = len(item["expressions"])
        assert n == MAX_EXPRESSIONS_PER_SAMPLE
        assert item["answer"].count("[SEG]") + item["answer"].count("[REJ]") == n
        assert item["answer"].count("[REJ]") == sum(item["no_target"])
        n_seg = item["answer"].count("[SEG]")
        assert (0 if item["masks"] is None else item["masks"].shape[0]) == n_seg
        # masks follow the [SEG] slots in answer order, at the original size
        seg_exprs = [e for e, empty in zip(item["expressions"], item["no_target"]) if not empty]
        for m, e in zip(item["masks"], seg_exprs):
            k = int(e.split()[1].strip("."))
            assert torch.equal(m, torch.from_numpy(sample.referents[k].mask))
        assert item["masks"].shape[1:] == (60, 90)


def test_all_rejected_sample_has_no_masks():
    item = ConversationDataset([_sample(2, empty=(0, 1))])[0]
    assert item["masks"] is None and "[SEG]" not in item["answer"]


def test_collator_labels_padding_masks_and_forward(tiny_setup):
    model, processor = tiny_setup
    samples = [_sample(1, size=(40, 50), image_id=0), _sample(4, empty=(1,), size=(70, 30), image_id=1),
               _sample(2, empty=(0, 1), image_id=2)]
    items = [ConversationDataset(samples, seed=1)[i] for i in range(3)]
    batch = MLLMSegCollator(processor)(items)
    ids, labels, attn = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == attn.shape
    assert (labels[attn == 0] == -100).all() and (attn == 0).any()  # padding is ignored
    tok = processor.tokenizer
    for i, item in enumerate(items):
        answer_ids = labels[i][labels[i] != -100]
        # loss only on the answer and its closing <|im_end|> (+ the turn's newline)
        # (the item marks its expressions as user text, for escaping; the tokens hold the plain text)
        assert tok.decode(answer_ids).rstrip("\n") == unmark(item["answer"])[0] + "<|im_end|>"
    assert [None if m is None else tuple(m.shape) for m in batch["masks"]] == [(1, 40, 50), (3, 70, 30), None]
    model.train()
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.mask_loss > 0 and out.lm_loss > 0
    out.loss.backward()
    assert model.mask_decoder.parameters().__next__().grad is not None
    model.zero_grad()
    model.eval()


def test_collator_mixed_tile_counts(tiny_setup):
    model, processor = tiny_setup
    samples = [_sample(2, size=(112, 112), image_id=0), _sample(2, empty=(0,), size=(112, 336), image_id=1)]
    items = [ConversationDataset(samples)[i] for i in range(2)]
    batch = MLLMSegCollator(processor, tiling="dynamic", max_tiles=4)(items)
    tiles = (batch["input_ids"] == model.config.image_token_id).sum(1) // model.config.tokens_per_tile
    assert tiles[0] != tiles[1] and int(tiles.sum()) == batch["pixel_values"].shape[0]
    with torch.no_grad():
        out = model(**batch)
    assert [p.shape[0] for p in out.pred_masks] == [2, 1] and torch.isfinite(out.loss)

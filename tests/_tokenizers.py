"""Tokenizers in the conventions of the two backbone families MLLMSeg is released on, trained locally:

* Qwen2 style (InternVL2.5-1B / 4B, and the tiny models): byte-level BPE, no BOS ([`mllmseg.tiny.build_tiny_tokenizer`]).
* InternLM2 style (InternVL2.5-2B / 8B): sentencepiece-like (Metaspace pre-tokenizer, `▁` for spaces), a BOS `<s>`
  put before every text by default, `</s>` as EOS, and the chat tokens added.
"""
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from mllmseg.remote_code.configuration_mllmseg import ADDED_TOKENS
from mllmseg.tiny import _CORPUS


def build_internlm2_style_tokenizer(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    base = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=base + ["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=list("\n:,.?!\'\"()[]-_/<>|ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
                                  show_progress=False)
    tok.train_from_iterator([line.replace("{}", "the red circle") for line in _CORPUS] * 4, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>",
        extra_special_tokens=list(ADDED_TOKENS), model_max_length=4096,
    )
    return tokenizer

"""`mllmseg convert-upstream` / `mllmseg convert-internvl`: original-layout checkpoints -> remote-code checkpoints."""
from __future__ import annotations


def register(subparsers) -> None:
    for name, helptext in (
        ("convert-upstream", "convert a released MLLMSeg checkpoint (reference layout: vision_model/mlp1/"
                             "language_model/res_decoder) into a remote-code checkpoint"),
        ("convert-internvl", "convert an original-layout InternVL2.5/InternVL3 base into an MLLMSeg checkpoint "
                             "ready for training ([SEG]/[REJ] added, decoder at the reference init)"),
    ):
        parser = subparsers.add_parser(name, help=helptext, description=helptext)
        parser.add_argument("src", help="source folder (config.json + weights, tokenizer files)")
        parser.add_argument("dst", help="output folder")
        parser.add_argument("--tokenizer", default=None,
                            help="folder with a tokenizer (tokenizer.json, or a sentencepiece tokenizer.model) to use "
                                 "instead of the source's; a source with only tokenizer.model is converted locally "
                                 "(needs pip install mllmseg[sentencepiece])")
        parser.add_argument("--lora-scale", type=float, default=None,
                            help="lora_alpha / r for unmerged LoRA weights (default: adapter_config.json, else 2.0 "
                                 "when the config says use_llm_lora/use_backbone_lora)")
        parser.set_defaults(func=run, base=name == "convert-internvl")


def run(args) -> int:
    from ..convert import convert_internvl, convert_upstream

    convert = convert_internvl if args.base else convert_upstream
    dst = convert(args.src, args.dst, tokenizer=args.tokenizer, lora_scale=args.lora_scale)
    print(f"wrote {dst}")
    return 0

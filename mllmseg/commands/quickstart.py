"""`mllmseg quickstart`: build a tiny model, save it as a remote-code checkpoint, reload it through
`AutoModel` / `AutoProcessor` with `trust_remote_code=True`, and segment an image with it."""
from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("quickstart", help="build, save, reload and run a tiny MLLMSeg model (CPU, offline)")
    parser.add_argument("--output-dir", default="mllmseg-quickstart", help="where the checkpoint goes")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def run(args) -> int:
    import numpy as np
    import torch
    from PIL import Image, ImageDraw
    from transformers import AutoModel, AutoProcessor

    from ..tiny import build_processor, build_tiny_model

    out = Path(args.output_dir)
    model, tokenizer = build_tiny_model(seed=args.seed)
    processor = build_processor(tokenizer, model.config)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    print(f"saved a tiny MLLMSeg checkpoint ({sum(p.numel() for p in model.parameters()):,} parameters) to {out}")

    model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    print(f"reloaded {type(model).__name__} from remote code ({type(model).__module__})")

    image = Image.new("RGB", (160, 120), (40, 90, 160))
    ImageDraw.Draw(image).ellipse((20, 20, 80, 80), fill=(220, 30, 30))
    with torch.inference_mode():
        result = model.segment(processor, image, ["the red circle", "the green square"])
    for expr, mask, box, score, rej in zip(result.expressions, result.masks, result.boxes, result.scores, result.rejected):
        print(f"  {expr!r}: rejected={bool(rej)} mask area={int(mask.sum())} px box={box.tolist()} score={float(score):.3f}")
    print(f"  answer: {result.text!r}")
    print("(an untrained model: run `mllmseg train` to make the masks meaningful)")
    return 0

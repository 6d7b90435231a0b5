"""`mllmseg segment`: segment what one or more referring expressions describe in one image; write an overlay PNG
and (optionally) a JSON with one record per expression (COCO RLE, box, score, `[REJ]` flag)."""
from __future__ import annotations

import json
from pathlib import Path

DTYPES = ("auto", "float32", "bfloat16", "float16")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "segment",
        help="segment referring expressions in an image; write an overlay PNG and a JSON",
        description="Loads MODEL with AutoModel/AutoProcessor (trust_remote_code=True), runs model.segment on IMAGE "
        "with every EXPRESSION (one mask each, or [REJ] when nothing matches) and writes an overlay: each mask in its "
        "own colour with its box and expression; rejected expressions are listed under the image.",
        epilog="example: mllmseg segment mllmseg-quickstart/run/final photo.png 'the red circle' 'the blue square' "
        "--out overlay.png --json result.json",
    )
    parser.add_argument("model", metavar="MODEL", help="checkpoint folder (or Hub id, if reachable)")
    parser.add_argument("image", metavar="IMAGE", help="image file (PNG, JPEG, ...) or http(s) URL (fetched unless "
                        "HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set)")
    # nargs="*" rather than "+": a missing expression gets our one-line error instead of argparse's usage block.
    parser.add_argument("expressions", metavar="EXPRESSION", nargs="*", help="one or more referring expressions")
    parser.add_argument("--out", help="overlay PNG to write (default: <IMAGE stem>_overlay.png in the current folder)")
    parser.add_argument("--json", dest="json_path", help="also write the results as JSON here")
    parser.add_argument("--tiling", choices=("single", "dynamic"), help="default: the checkpoint's seg_tiling")
    parser.add_argument("--mode", choices=("fast", "generate"), default="fast",
                        help="fast: one teacher-forced forward (paper protocol, default); generate: free decoding")
    parser.add_argument("--threshold", type=float, default=0.5, help="mask probability threshold (default 0.5)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype (default: the checkpoint's)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is available")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..loading import check_model_path, load_model, read_image
    from ..visualize import draw_overlay

    expressions = [e.strip() for e in args.expressions]
    if not expressions:
        raise ValueError("give at least one EXPRESSION after IMAGE, e.g. mllmseg segment MODEL photo.png 'the dog'")
    if any(not e for e in expressions):
        raise ValueError("an EXPRESSION is empty; give non-empty descriptions")
    if not 0.0 < args.threshold < 1.0:
        raise ValueError(f"--threshold must be between 0 and 1, got {args.threshold}")
    # Cheap checks before the (slow) model load, so a typo fails at once.
    check_model_path(args.model)
    image = read_image(args.image)
    out_path = Path(args.out) if args.out else Path(f"{Path(args.image).stem}_overlay.png")
    if out_path.suffix.lower() != ".png":
        raise ValueError(f"--out must be a .png file, got {out_path}")

    import torch

    model, processor = load_model(args.model, args.dtype, args.cpu)
    with torch.inference_mode():
        result = model.segment(processor, image, expressions, mode=args.mode, tiling=args.tiling,
                               threshold=args.threshold, return_rle=True)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    draw_overlay(image, result, expressions).save(out_path)
    records = result.to_records()
    if args.json_path:
        payload = {
            "model": args.model,
            "image": args.image,
            "image_size": [image.width, image.height],  # RLE "size" is [height, width], as COCO
            "mode": args.mode,
            "tiling": args.tiling or getattr(model.config, "seg_tiling", None),
            "threshold": args.threshold,
            "answer": result.text,
            "results": records,
        }
        json_path = Path(args.json_path)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")

    for record in records:
        if record["rejected"]:
            print(f"{record['expression']!r}: [REJ] not found")
        else:
            print(f"{record['expression']!r}: box {record['box']} score {record['score']:.3f} area {record['area']} px")
    print(f"overlay: {out_path}" + (f"; json: {args.json_path}" if args.json_path else ""))
    return 0

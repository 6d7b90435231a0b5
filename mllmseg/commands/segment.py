"""`mllmseg segment`: segment what one or more referring expressions describe in one or more images; write one
overlay PNG per image and (optionally) a JSON with one entry per image and one record per expression (COCO RLE,
box, score, `[REJ]` flag).

Two forms: `mllmseg segment MODEL IMAGE EXPRESSION...` (one image, as before) and
`mllmseg segment MODEL IMAGE... -e EXPRESSION [-e EXPRESSION ...]` (every positional after MODEL is an image; the
same expressions are asked of each, all images in one batched `model.segment` call).
"""
from __future__ import annotations

import json
from pathlib import Path

OVERLAY_SUFFIX = "_overlay.png"


def register(subparsers) -> None:
    from ..loading import DTYPES, add_runtime_arguments

    parser = subparsers.add_parser(
        "segment",
        help="segment referring expressions in one or more images; write overlay PNGs and a JSON",
        usage="%(prog)s [options] MODEL IMAGE EXPRESSION [EXPRESSION ...]\n"
              "       %(prog)s [options] MODEL IMAGE [IMAGE ...] -e EXPRESSION [-e EXPRESSION ...]",
        description="Loads MODEL with AutoModel/AutoProcessor (trust_remote_code=True; a LoRA adapter folder loads "
        "its base and merges the adapter), runs model.segment with every EXPRESSION (one mask each, or [REJ] when "
        "nothing matches) and writes an overlay per image: each mask in its own colour with its box and expression; "
        "rejected expressions are listed under the image. One image: MODEL IMAGE EXPRESSION... . Several images: "
        "MODEL IMAGE... -e EXPRESSION [-e ...]: with -e every positional after MODEL is an image, and all of them "
        "go through one batched model.segment call.",
        epilog="examples: mllmseg segment run/final photo.png 'the red circle' 'the blue square' --out overlay.png "
        "--json result.json | mllmseg segment run/final a.png b.png c.png -e 'the red circle' --out-dir overlays "
        "--json results.json",
    )
    parser.add_argument("model", metavar="MODEL", help="checkpoint folder, LoRA adapter folder (<run>/final of a LoRA "
                        "run) or Hub id, if reachable")
    # nargs="*" rather than "+": a missing expression gets our one-line error instead of argparse's usage block.
    parser.add_argument("inputs", metavar="IMAGE/EXPRESSION", nargs="*",
                        help="without -e: one IMAGE, then its EXPRESSIONs; with -e: IMAGEs only. An image is a file "
                        "(PNG, JPEG, ...) or an http(s) URL (fetched unless HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE "
                        "is set)")
    parser.add_argument("-e", "--expression", dest="expression_flags", action="append", default=[],
                        metavar="EXPRESSION", help="an expression to segment in every image (repeatable); then "
                        "every positional after MODEL is an image")
    parser.add_argument("--out", help="overlay PNG to write, one image only (default: <IMAGE stem>_overlay.png in "
                        "--out-dir)")
    parser.add_argument("--out-dir", default=".", help="folder for the overlays, named <IMAGE stem>_overlay.png "
                        "(default: the current folder)")
    parser.add_argument("--json", dest="json_path", help="also write the results as JSON here (one entry per image)")
    parser.add_argument("--tiling", choices=("single", "dynamic"), help="default: the checkpoint's seg_tiling")
    parser.add_argument("--mode", choices=("fast", "per_expression", "generate"), default="fast",
                        help="fast: one teacher-forced forward (paper protocol, default); per_expression: each "
                        "expression in its own conversation (the image prefix computed once); generate: free decoding")
    parser.add_argument("--threshold", type=float, default=0.5, help="mask probability threshold (default 0.5)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype (default: the checkpoint's)")
    add_runtime_arguments(parser)
    parser.set_defaults(func=run, intermixed="inputs")  # positionals may also follow the options (see cli.py)


def split_inputs(inputs: list[str], expression_flags: list[str]) -> tuple[list[str], list[str]]:
    """The positionals after MODEL -> (images, expressions): with -e every positional is an image, else the first
    is the image and the rest are its expressions."""
    if expression_flags:
        if not inputs:
            raise ValueError("give at least one IMAGE, e.g. mllmseg segment MODEL photo.png -e 'the dog'")
        return list(inputs), list(expression_flags)
    if not inputs:
        raise ValueError("give an IMAGE and at least one EXPRESSION, e.g. mllmseg segment MODEL photo.png 'the dog'")
    return inputs[:1], inputs[1:]


def check_expressions(expressions: list[str]) -> list[str]:
    expressions = [e.strip() for e in expressions]
    if not expressions:
        raise ValueError("give at least one EXPRESSION after IMAGE, e.g. mllmseg segment MODEL photo.png 'the dog' "
                         "(several images: mllmseg segment MODEL a.png b.png -e 'the dog')")
    if any(not e for e in expressions):
        raise ValueError("an EXPRESSION is empty; give non-empty descriptions")
    return expressions


def image_stem(image: str) -> str:
    """The name an image's overlay is made from: the file stem (a URL's last path piece)."""
    return Path(image.split("?", 1)[0].rstrip("/")).stem or "image"


def overlay_paths(images: list[str], out: str | None, out_dir: str) -> list[Path]:
    """One overlay path per image: `--out` for a single image, else `<out_dir>/<stem>_overlay.png`; two images with
    the same stem would overwrite each other's overlay, so they are refused, naming both."""
    if out is not None:
        if len(images) > 1:
            raise ValueError(f"--out names one overlay but {len(images)} images were given; use --out-dir DIR "
                             f"(overlays are named <IMAGE stem>{OVERLAY_SUFFIX})")
        path = Path(out)
        if path.suffix.lower() != ".png":
            raise ValueError(f"--out must be a .png file, got {path}")
        return [path]
    seen: dict[str, str] = {}
    for image in images:
        stem = image_stem(image)
        if stem in seen:
            raise ValueError(f"images {seen[stem]} and {image} have the same name stem {stem!r}: their overlays "
                             f"would both be {stem}{OVERLAY_SUFFIX}; rename one or run them apart")
        seen[stem] = image
    return [Path(out_dir) / f"{stem}{OVERLAY_SUFFIX}" for stem in seen]


def image_entry(image_arg: str, image, result, overlay: Path) -> dict:
    """One image's JSON entry."""
    return {
        "image": image_arg,
        "image_size": [image.width, image.height],  # RLE "size" is [height, width], as COCO
        "overlay": str(overlay),
        "answer": result.text,
        "results": result.to_records(),
    }


def print_records(image_arg: str, records: list[dict], several: bool) -> None:
    prefix = f"{image_arg}: " if several else ""
    for record in records:
        if record["rejected"]:
            print(f"{prefix}{record['expression']!r}: [REJ] not found")
        else:
            print(f"{prefix}{record['expression']!r}: box {record['box']} score {record['score']:.3f} "
                  f"area {record['area']} px")


def run(args) -> int:
    from ..loading import apply_runtime_arguments, check_model_path, load_model, read_image
    from ..visualize import draw_overlay

    images_args, expressions = split_inputs(args.inputs, args.expression_flags)
    several = len(images_args) > 1
    expressions = check_expressions(expressions)
    if not 0.0 < args.threshold < 1.0:
        raise ValueError(f"--threshold must be between 0 and 1, got {args.threshold}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    # Cheap checks before the (slow) model load, so a typo fails at once.
    out_paths = overlay_paths(images_args, args.out, args.out_dir)
    check_model_path(args.model)
    images = [read_image(path) for path in images_args]
    device = apply_runtime_arguments(args)

    import torch

    model, processor = load_model(args.model, args.dtype, device=device)
    with torch.inference_mode():  # one batched call: a list of images, the same expressions for each
        results = model.segment(processor, images, [expressions] * len(images), mode=args.mode, tiling=args.tiling,
                                threshold=args.threshold, return_rle=True, batch_size=args.batch_size)

    entries = []
    for image_arg, image, result, out_path in zip(images_args, images, results, out_paths):
        out_path.parent.mkdir(parents=True, exist_ok=True)
        draw_overlay(image, result, expressions).save(out_path)
        entries.append(image_entry(image_arg, image, result, out_path))
        print_records(image_arg, entries[-1]["results"], several)
    if args.json_path:
        payload = {
            "model": args.model,
            "mode": args.mode,
            "tiling": args.tiling or getattr(model.config, "seg_tiling", None),
            "threshold": args.threshold,
            "expressions": expressions,
            "images": entries,
        }
        if not several:  # the one-image layout of earlier versions, kept at the top level too
            payload.update({key: entries[0][key] for key in ("image", "image_size", "answer", "results")})
        json_path = Path(args.json_path)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    shown = out_paths[0] if not several else f"{len(out_paths)} overlays in {Path(args.out_dir)}"
    print(f"overlay: {shown}" + (f"; json: {args.json_path}" if args.json_path else ""))
    return 0

"""`mllmseg demo`: the Gradio web demo (Segment and Chat tabs) on a local port."""
from __future__ import annotations

from ..demo import DemoLimits  # light: gradio is imported only when a demo is built


def register(subparsers) -> None:
    from ..loading import DTYPES, add_runtime_arguments

    parser = subparsers.add_parser(
        "demo",
        help="web demo (Gradio): segment expressions and chat about an image in the browser",
        description="Serves a Gradio app for MODEL on http://HOST:PORT: a Segment tab (upload an image, type "
        "expressions, see the overlay and a table of boxes, scores and [REJ] flags) and a Chat tab. Local only: no "
        "share link, analytics off. Needs gradio: pip install 'mllmseg[demo]'.",
        epilog="example: mllmseg demo mllmseg-quickstart/final --port 7860",
    )
    parser.add_argument("model", metavar="MODEL", nargs="?",
                        help="checkpoint folder, LoRA adapter folder or Hub id (default: ./mllmseg-quickstart/final, made by "
                        "`bash dev.sh quickstart`)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1, this machine only; 0.0.0.0 exposes it to the "
                        "network)")
    parser.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860 or the next free one)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="chat answer length limit (default 128)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype (default: the checkpoint's)")
    add_runtime_arguments(parser)
    defaults = DemoLimits()
    parser.add_argument("--max-pixels", type=int, default=defaults.max_pixels,
                        help=f"largest image in pixels, checked before decoding (default {defaults.max_pixels})")
    parser.add_argument("--max-expressions", type=int, default=defaults.max_expressions,
                        help=f"expressions per Segment request (default {defaults.max_expressions})")
    parser.add_argument("--max-file-size", type=float, default=defaults.max_file_size / 2**20, metavar="MB",
                        help=f"largest upload in MB (default {defaults.max_file_size / 2**20:g})")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..cli import CommandError
    from ..demo import DEFAULT_MODEL, import_gradio, launch_demo
    from ..loading import apply_runtime_arguments, check_model_path

    model = args.model
    if model is None:
        if not (DEFAULT_MODEL / "config.json").is_file():
            raise CommandError(f"no MODEL given and no quickstart checkpoint at ./{DEFAULT_MODEL}; make one with "
                               "`bash dev.sh quickstart` (or pass a checkpoint folder)")
        model = str(DEFAULT_MODEL)
    check_model_path(model)
    if args.port is not None and not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be >= 1")
    if not args.max_file_size > 0:
        raise ValueError(f"--max-file-size must be a positive number of MB, got {args.max_file_size}")
    for flag, value in (("--max-pixels", args.max_pixels), ("--max-expressions", args.max_expressions)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    device = apply_runtime_arguments(args)
    limits = DemoLimits(max_pixels=args.max_pixels, max_expressions=args.max_expressions,
                        max_file_size=int(args.max_file_size * 2**20))
    try:
        import_gradio()  # before the model load: a missing extra fails at once
    except ImportError as error:
        raise CommandError(str(error)) from None
    print(f"loading {model} ...", flush=True)
    launch_demo(model, host=args.host, port=args.port, dtype=args.dtype, device=device, block=True,
                max_new_tokens=args.max_new_tokens, limits=limits)
    return 0

"""`mllmseg chat`: multi-turn InternVL chat about one image, one question per line from stdin (a terminal or a
pipe), with the conversation history kept between turns."""
from __future__ import annotations

import sys

EXIT_WORDS = ("exit", "quit")


def register(subparsers) -> None:
    from ..loading import DTYPES, add_runtime_arguments

    parser = subparsers.add_parser(
        "chat",
        help="chat about an image (questions from stdin, one per line; history kept)",
        description="Loads MODEL (trust_remote_code=True) and answers questions about IMAGE with model.chat, keeping "
        "the history. Reads one question per line from stdin until end of input or a line 'exit' / 'quit'; works "
        "interactively and with piped input (echo 'Describe the image.' | mllmseg chat MODEL photo.png). Answers keep "
        "[SEG] / [REJ] tokens.",
    )
    parser.add_argument("model", metavar="MODEL", help="checkpoint folder, LoRA adapter folder (<run>/final of a LoRA "
                        "run) or Hub id, if reachable")
    parser.add_argument("image", metavar="IMAGE", help="image file (PNG, JPEG, ...) or http(s) URL (fetched unless "
                        "HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set)")
    parser.add_argument("--tiling", choices=("single", "dynamic"), default="dynamic",
                        help="image tiling (default: dynamic, as InternVL chat)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="answer length limit (default 128)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype (default: the checkpoint's)")
    add_runtime_arguments(parser)
    parser.set_defaults(func=run)


def questions(stream, interactive: bool):
    """Non-empty stripped lines until EOF or an exit word; prompts only on a terminal."""
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = stream.readline()
        if not line:  # EOF
            return
        question = line.strip()
        if not question:
            continue
        if question.lower() in EXIT_WORDS:
            return
        yield question


def run(args) -> int:
    from ..loading import apply_runtime_arguments, check_model_path, load_model, read_image

    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be >= 1")
    check_model_path(args.model)
    image = read_image(args.image)
    device = apply_runtime_arguments(args)

    import torch

    model, processor = load_model(args.model, args.dtype, device=device)
    pixel_values = processor.image_processor(image, tiling=args.tiling)["pixel_values"].to(model.device, model.dtype)
    generation_config = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting about {args.image} ({pixel_values.shape[0]} tiles); 'exit' or Ctrl-D ends")
    history = None  # None on the first turn: model.chat then puts the <image> placeholder before the question
    turns = 0
    for question in questions(sys.stdin, interactive):
        with torch.inference_mode():
            answer, history = model.chat(processor.tokenizer, pixel_values, question, generation_config,
                                         history=history, return_history=True)
        turns += 1
        if not interactive:  # a piped transcript shows the question too
            print(f"user: {question}")
        print(f"assistant: {answer}", flush=True)
    if not interactive:
        print(f"({turns} turn{'s' if turns != 1 else ''})")
    return 0

"""The MLLMSeg web demo (Gradio): a Segment tab (image + referring expressions -> overlay and a table) and a Chat
tab (multi-turn `model.chat` about an image).

Gradio is an optional dependency (`pip install mllmseg[demo]`); it is imported only when a demo is built. The demo
is local only: it binds to loopback by default, offers no share link, turns Gradio's analytics off and uses system
fonts, so neither the server nor the page reaches the network.
"""
from __future__ import annotations

import atexit
import dataclasses
import inspect
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

DEFAULT_MODEL = Path("mllmseg-quickstart") / "final"  # where `mllmseg quickstart` saves its merged checkpoint
TABLE_HEADERS = ["expression", "box (x0, y0, x1, y1)", "score", "rejected"]
# Folder names that say nothing about the model (a run's layout), skipped when a title is made from a path.
_GENERIC_FOLDERS = re.compile(r"^(final|run|runs|output|outputs|merged|checkpoint(-\d+)?|\.)$")


@dataclasses.dataclass(frozen=True)
class DemoLimits:
    """What one request may ask of the demo (a public page must not be able to exhaust the machine).

    Attributes:
        max_pixels: largest image, checked on the file's header before anything is decoded (Gradio hands the demo
            the uploaded file's path, not decoded pixels). 16 MP covers a 12 MP phone photo; during `segment` each
            expression costs about 5 bytes per pixel (float probabilities and a bool mask at the image size).
        max_expressions: expressions per Segment request.
        max_file_size: largest upload in bytes, enforced by Gradio's server before the file is stored.
    """

    max_pixels: int = 16_000_000
    max_expressions: int = 10
    max_file_size: int = 25 * 2**20

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DemoLimits.{field.name} must be a positive integer, got {value!r}")


def import_gradio():
    """Gradio with analytics off, or an ImportError that says how to install it."""
    # Must be set before gradio is imported: it reads the variable at import and launch time.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("GRADIO_SERVER_NAME", "127.0.0.1")
    try:
        import gradio as gr
    except ImportError as error:
        raise ImportError(f"the web demo needs gradio ({error}); install it with: pip install 'mllmseg[demo]' "
                          "(or pip install 'gradio>=5')") from None
    return gr


def split_expressions(text: str | None) -> list[str]:
    """One expression per line or separated by ';' (blank pieces dropped)."""
    return [piece.strip() for piece in re.split(r"[;\n]", text or "") if piece.strip()]


def open_image(image, limits: DemoLimits):
    """An upload (a file path, as Gradio passes it, or a PIL image from Python) as RGB in the frame a viewer sees,
    through the project's guarded loader: over `limits.max_pixels` (read from the header, before decoding), over
    Pillow's decompression-bomb limit, or not an image at all is a ValueError saying so."""
    from .loading import read_image
    from .remote_code.image_processing_mllmseg import load_image

    if image is None:
        raise ValueError("upload an image first")
    if isinstance(image, (str, os.PathLike)):
        return read_image(os.fspath(image), max_pixels=limits.max_pixels)
    return load_image(image, max_pixels=limits.max_pixels)


def segment_compact(model, processor, image, expressions: list[str], tiling: str = "single",
                    threshold: float = 0.5):
    """`model.segment` on one RGB image, keeping the result compact: bool masks `(E, h, w)`, no float
    probabilities (4 bytes per pixel and expression, which the page never shows)."""
    import torch

    with torch.inference_mode():
        result = model.segment(processor, image, expressions, tiling=tiling, threshold=float(threshold))
    return dataclasses.replace(result, probabilities=None)


def segment_image(model, processor, image, text: str, tiling: str = "single", threshold: float = 0.5,
                  limits: DemoLimits = DemoLimits()):
    """What the Segment tab does: (overlay image, table rows, answer text). `image` is a file path (what Gradio
    passes) or a PIL image. Raises ValueError on bad input (no image, not an image, too large, no or too many
    expressions)."""
    from .visualize import draw_overlay

    if image is None:
        raise ValueError("upload an image first")
    expressions = split_expressions(text)
    if not expressions:
        raise ValueError("type at least one expression (one per line, or separated by ';')")
    if len(expressions) > limits.max_expressions:
        raise ValueError(f"{len(expressions)} expressions: this demo takes at most {limits.max_expressions} per "
                         "request")
    image = open_image(image, limits)
    result = segment_compact(model, processor, image, expressions, tiling, threshold)
    rows = [
        [r["expression"], "" if r["box"] is None else ", ".join(str(v) for v in r["box"]),
         round(float(score), 3), "yes" if r["rejected"] else "no"]
        for r, score in zip(result.to_records(), result.scores)
    ]
    return draw_overlay(image, result, expressions), rows, result.text


def chat_turn(model, processor, image, question: str, history: list | None, tiling: str = "dynamic",
              max_new_tokens: int = 128, limits: DemoLimits = DemoLimits()):
    """One chat turn: (answer, new history). `image` as for `segment_image`; `history` is model.chat's list of
    (question, answer) pairs."""
    import torch

    if image is None:
        raise ValueError("upload an image first")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("type a question")
    image = open_image(image, limits)
    pixel_values = processor.image_processor(image, tiling=tiling)["pixel_values"]
    with torch.inference_mode():
        answer, history = model.chat(processor.tokenizer, pixel_values.to(model.device, model.dtype), question.strip(),
                                     dict(max_new_tokens=max_new_tokens, do_sample=False),
                                     history=history or None, return_history=True)
    return answer, history


def example_inputs(folder: str | os.PathLike, count: int = 3, max_expressions: int = 3) -> list[tuple[str, str]]:
    """Example inputs for the Segment tab that work offline: `count` synthetic shape scenes (held-out draws of the
    scenes the shipped tiny base was pretrained on, 224 x 224) written as PNGs into `folder`, each with up to
    `max_expressions` expressions the generator resolved against that scene (by colour, shape, position, size or
    count; some may name several shapes, or none, which the model should answer with [REJ]). Returns `[(image path, "expression; expression"), ...]`; the same scenes every time."""
    from PIL import Image

    from .data.synthetic import SyntheticReferringDataset
    from .training.recipes import synthetic_scene_kwargs

    kwargs = synthetic_scene_kwargs("tiny_base")
    scenes = SyntheticReferringDataset(count, seed=0, split="demo", **kwargs)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    examples = []
    for index in range(count):
        scene = scenes.scene(index)
        path = folder / f"shapes_{index}.png"
        Image.fromarray(scene.image).save(path)
        examples.append((str(path), "; ".join(e.text for e in scene.expressions[:max_expressions])))
    return examples


def chat_examples(segment_examples: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Example (image, question) pairs for the Chat tab, on the first Segment example's scene."""
    image, expressions = segment_examples[0]
    return [(image, "What shapes are in this image?"),
            (image, f"Please segment {split_expressions(expressions)[0]}.")]


def model_title(model, model_path: str | None = None) -> str:
    """A title for the page from the model: a release card's own `# heading` (its README.md), else the Hub id,
    else the nearest folder name that is not a run's layout (`mllmseg-quickstart/run/final` -> `mllmseg-quickstart`).
    `model_path` defaults to where the model was loaded from."""
    model_path = model_path or getattr(model.config, "_name_or_path", "") or None
    if model_path:
        path = Path(model_path)
        card = path / "README.md"
        if card.is_file():
            for line in card.read_text(encoding="utf-8", errors="replace").splitlines():
                if line.startswith("# ") and line[2:].strip() and "{{" not in line:
                    return line[2:].strip()
        if not path.exists():
            return model_path  # a Hub id
        for part in reversed(path.resolve().parts):
            if not _GENERIC_FOLDERS.match(part):
                return part
    return "MLLMSeg"


def model_summary(model) -> str:
    """One line about the model from its config: backbones, mask head, parameters."""
    config = model.config
    parts = []
    vision = getattr(getattr(config, "vision_config", None), "model_type", None)
    text = getattr(getattr(config, "text_config", None), "model_type", None)
    if vision or text:
        parts.append(" + ".join(p for p in (vision, text and f"{text} LLM") if p))
    head = getattr(config, "mask_head", None)
    if head:
        parts.append({"dsff": "DSFF mask decoder", "self1e": "SELF1E mask head"}.get(head, f"{head} mask head"))
    count = sum(p.numel() for p in model.parameters())
    parts.append(f"{count / 1e9:.2f}B parameters" if count >= 1e9 else f"{count / 1e6:.1f}M parameters")
    return ", ".join(parts)


def _local_theme(gr):
    # Gradio's default theme pulls its fonts from Google Fonts; system fonts keep the page offline.
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def build_demo(model, processor, title: str | None = None, max_new_tokens: int = 128,
               limits: DemoLimits = DemoLimits(), examples_dir: str | os.PathLike | None = None):
    """The Gradio app for a loaded model and processor (returns a `gr.Blocks`; serve it with `launch_app`, which
    applies `limits.max_file_size`). `title` defaults to `model_title(model)`; `max_new_tokens` limits chat answers;
    `limits` bounds each request. The example images (`example_inputs`) are written to `examples_dir` (default: a
    new temporary folder, which Gradio may serve files from)."""
    gr = import_gradio()
    title = title or model_title(model)
    if examples_dir is None:
        examples_dir = tempfile.mkdtemp(prefix="mllmseg-demo-examples-")
        atexit.register(shutil.rmtree, examples_dir, ignore_errors=True)
    seg_examples = example_inputs(examples_dir, max_expressions=min(3, limits.max_expressions))
    seg_tiling = getattr(model.config, "seg_tiling", "single") or "single"
    blocks_kwargs = {"title": title, "analytics_enabled": False}

    def no_share(component, keep):
        # Gradio's per-component "share" buttons post to Hugging Face Spaces; a local demo offers none.
        params = inspect.signature(getattr(gr, component).__init__).parameters
        if "buttons" in params:  # gradio 6
            return {"buttons": keep}
        return {"show_share_button": False} if "show_share_button" in params else {}
    if "theme" in inspect.signature(gr.Blocks.__init__).parameters:  # gradio 5; gradio 6 takes it in launch()
        blocks_kwargs["theme"] = _local_theme(gr)

    # One model for both tabs: one call at a time (chat briefly switches the shared tokenizer to left padding,
    # which a concurrent segment call must not see).
    model_lock = threading.Lock()

    def on_segment(image, text, tiling, threshold):
        try:
            with model_lock:
                return segment_image(model, processor, image, text, tiling, threshold, limits)
        except ValueError as error:  # bad input (also ImageLoadError): shown in the page, not a server traceback
            raise gr.Error(str(error)) from None

    def on_chat(image, question, history, messages):
        try:
            with model_lock:
                answer, history = chat_turn(model, processor, image, question, history, max_new_tokens=max_new_tokens,
                                            limits=limits)
        except ValueError as error:
            raise gr.Error(str(error)) from None
        messages = list(messages or []) + [{"role": "user", "content": question.strip()},
                                           {"role": "assistant", "content": answer}]
        return "", history, messages

    def on_clear():
        return [], []

    with gr.Blocks(**blocks_kwargs) as demo:
        gr.Markdown(f"# {title}\n{model_summary(model)}. Referring expression segmentation and chat: each expression "
                    "gets its own colour; `[REJ]` means the model found no such object. Limits: images up to "
                    f"{limits.max_pixels / 1e6:g} MP and {limits.max_file_size / 2**20:g} MB, "
                    f"{limits.max_expressions} expressions per request.")
        with gr.Tab("Segment", elem_id="segment-tab"):
            with gr.Row():
                with gr.Column():
                    # A file path, not decoded pixels: Gradio only reads the header, our guarded loader decodes.
                    seg_image = gr.Image(type="filepath", image_mode=None, label="Image",
                                         sources=["upload", "clipboard"], elem_id="segment-image")
                    expressions = gr.Textbox(label="Expressions (one per line, or separated by ';')", lines=3,
                                             placeholder="the red circle; the blue square", elem_id="segment-text")
                    with gr.Row():
                        tiling = gr.Radio(["single", "dynamic"], value=seg_tiling, label="Tiling",
                                          elem_id="segment-tiling")
                        threshold = gr.Slider(0.05, 0.95, value=0.5, step=0.05, label="Mask threshold",
                                              elem_id="segment-threshold")
                    seg_button = gr.Button("Segment", variant="primary", elem_id="segment-button")
                with gr.Column():
                    # PNG, not Gradio's default WebP: lossless, so the overlay colours are exactly the model's masks.
                    overlay = gr.Image(type="pil", format="png", label="Overlay", interactive=False,
                                       elem_id="segment-overlay", **no_share("Image", ["download", "fullscreen"]))
                    table = gr.Dataframe(headers=TABLE_HEADERS, label="Results", interactive=False,
                                         elem_id="segment-table")
                    answer_text = gr.Textbox(label="Model answer", interactive=False, elem_id="segment-answer")
            # Not cached: clicking one fills the inputs; the model runs when Segment is pressed.
            gr.Examples([list(e) for e in seg_examples], [seg_image, expressions], label="Examples (synthetic shapes)",
                        cache_examples=False, elem_id="segment-examples")
            seg_button.click(on_segment, [seg_image, expressions, tiling, threshold], [overlay, table, answer_text])
            expressions.submit(on_segment, [seg_image, expressions, tiling, threshold], [overlay, table, answer_text])
        with gr.Tab("Chat", elem_id="chat-tab"):
            history = gr.State([])
            with gr.Row():
                chat_image = gr.Image(type="filepath", image_mode=None, label="Image",
                                      sources=["upload", "clipboard"], elem_id="chat-image")
                with gr.Column():
                    chat_params = inspect.signature(gr.Chatbot.__init__).parameters
                    chat_kwargs = {"type": "messages"} if "type" in chat_params else {}  # gradio 5 needs the type
                    chat_kwargs.update(no_share("Chatbot", ["copy", "copy_all"]))
                    # Plain text: answers carry [SEG] / [REJ], which Markdown would read as link brackets.
                    chatbot = gr.Chatbot(label="Chat", elem_id="chat-log", render_markdown=False, **chat_kwargs)
                    question = gr.Textbox(label="Question", placeholder="Describe the image.", elem_id="chat-question")
                    with gr.Row():
                        send = gr.Button("Send", variant="primary", elem_id="chat-send")
                        clear = gr.Button("Clear", elem_id="chat-clear")
            gr.Examples([list(e) for e in chat_examples(seg_examples)], [chat_image, question], label="Examples",
                        cache_examples=False, elem_id="chat-examples")
            send.click(on_chat, [chat_image, question, history, chatbot], [question, history, chatbot])
            question.submit(on_chat, [chat_image, question, history, chatbot], [question, history, chatbot])
            clear.click(on_clear, None, [chatbot, history])
            # A new image starts a new conversation: the history refers to the old one. (The question box is left
            # alone: a question typed while the upload finishes must not be wiped.)
            chat_image.change(on_clear, None, [chatbot, history])
    demo.queue(default_concurrency_limit=1)  # requests wait in Gradio's queue rather than on the lock
    return demo


def launch_app(demo, host: str = "127.0.0.1", port: int | None = None, limits: DemoLimits = DemoLimits()) -> str:
    """Serve a built demo on http://host:port without blocking (loopback by default, never a share link; uploads
    over `limits.max_file_size` are refused by Gradio's server). Returns the local URL."""
    gr = import_gradio()
    # quiet: Gradio's banner suggests `share=True`, which this demo does not offer; we print the URL ourselves.
    launch_kwargs = dict(server_name=host, server_port=port, share=False, inbrowser=False,
                         prevent_thread_lock=True, show_error=True, quiet=True, max_file_size=limits.max_file_size)
    params = inspect.signature(gr.Blocks.launch).parameters
    optional = {"ssr_mode": False, "mcp_server": False, "theme": _local_theme(gr)}  # newer gradio versions only
    launch_kwargs.update({k: v for k, v in optional.items() if k in params})
    # Gradio checks its own URL after starting; a proxy from the environment must not see that request.
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY", ""), "127.0.0.1", "localhost", host]))
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = no_proxy
    _, local_url, _ = demo.launch(**launch_kwargs)
    return local_url


def launch_demo(model_path: str, host: str = "127.0.0.1", port: int | None = None, dtype: str = "auto",
                cpu: bool = False, block: bool = True, max_new_tokens: int = 128,
                limits: DemoLimits = DemoLimits(), device: str | None = None):
    """Load `model_path` and serve the demo on http://host:port (loopback by default, never a share link).
    `device`: a torch device string (default: the GPU when there is one, unless `cpu`)."""
    from .loading import load_model

    model, processor = load_model(model_path, dtype, cpu, device=device)
    demo = build_demo(model, processor, title=model_title(model, model_path), max_new_tokens=max_new_tokens,
                      limits=limits)
    local_url = launch_app(demo, host, port, limits)
    print(f"MLLMSeg demo running on {local_url} (Ctrl-C stops it)", flush=True)
    if block:
        demo.block_thread()  # until Ctrl-C, which closes the server
    return demo


__all__ = ["DEFAULT_MODEL", "DemoLimits", "build_demo", "example_inputs", "chat_examples", "launch_app", "launch_demo",
           "segment_image", "chat_turn", "open_image", "segment_compact", "model_title", "model_summary", "split_expressions", "import_gradio"]

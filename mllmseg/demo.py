"""The MLLMSeg web demo (Gradio): a Segment tab (image + referring expressions -> overlay and a table) and a Chat
tab (multi-turn `model.chat` about an image).

Gradio is an optional dependency (`pip install mllmseg[demo]`); it is imported only when a demo is built. The demo
is local only: it binds to loopback by default, offers no share link, turns Gradio's analytics off and uses system
fonts, so neither the server nor the page reaches the network.
"""
from __future__ import annotations

import inspect
import os
import re
import threading
from pathlib import Path

DEFAULT_MODEL = Path("mllmseg-quickstart") / "run" / "final"  # where `mllmseg quickstart` saves its checkpoint
TABLE_HEADERS = ["expression", "box (x0, y0, x1, y1)", "score", "rejected"]


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


def segment_image(model, processor, image, text: str, tiling: str = "single", threshold: float = 0.5):
    """What the Segment tab does: (overlay image, table rows, answer text). Raises ValueError on bad input."""
    import torch

    from .visualize import draw_overlay, result_records

    if image is None:
        raise ValueError("upload an image first")
    expressions = split_expressions(text)
    if not expressions:
        raise ValueError("type at least one expression (one per line, or separated by ';')")
    image = image.convert("RGB")
    with torch.inference_mode():
        result = model.segment(processor, image, expressions, tiling=tiling, threshold=float(threshold))
    rows = [
        [r["expression"], "" if r["box"] is None else ", ".join(str(v) for v in r["box"]),
         round(float(score), 3), "yes" if r["rejected"] else "no"]
        for r, score in zip(result_records(result, expressions), result.scores)
    ]
    return draw_overlay(image, result, expressions), rows, result.text


def chat_turn(model, processor, image, question: str, history: list | None, tiling: str = "dynamic",
              max_new_tokens: int = 128):
    """One chat turn: (answer, new history). `history` is model.chat's list of (question, answer) pairs."""
    import torch

    if image is None:
        raise ValueError("upload an image first")
    if not (question or "").strip():
        raise ValueError("type a question")
    pixel_values = processor.image_processor(image.convert("RGB"), tiling=tiling)["pixel_values"]
    with torch.inference_mode():
        answer, history = model.chat(processor.tokenizer, pixel_values.to(model.device, model.dtype), question.strip(),
                                     dict(max_new_tokens=max_new_tokens, do_sample=False),
                                     history=history or None, return_history=True)
    return answer, history


def _local_theme(gr):
    # Gradio's default theme pulls its fonts from Google Fonts; system fonts keep the page offline.
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def build_demo(model, processor, title: str = "MLLMSeg", max_new_tokens: int = 128):
    """The Gradio app for a loaded model and processor (returns a `gr.Blocks`; call `.launch()` or `launch_demo`).
    `max_new_tokens` limits chat answers."""
    gr = import_gradio()
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
                return segment_image(model, processor, image, text, tiling, threshold)
        except ValueError as error:  # bad input (also ImageLoadError): shown in the page, not a server traceback
            raise gr.Error(str(error)) from None

    def on_chat(image, question, history, messages):
        try:
            with model_lock:
                answer, history = chat_turn(model, processor, image, question, history, max_new_tokens=max_new_tokens)
        except ValueError as error:
            raise gr.Error(str(error)) from None
        messages = list(messages or []) + [{"role": "user", "content": question.strip()},
                                           {"role": "assistant", "content": answer}]
        return "", history, messages

    def on_clear():
        return [], []

    with gr.Blocks(**blocks_kwargs) as demo:
        gr.Markdown(f"# {title}\nReferring expression segmentation and chat with an InternVL MLLM and the DSFF mask "
                    "decoder. Each expression gets its own colour; `[REJ]` means the model found no such object.")
        with gr.Tab("Segment", elem_id="segment-tab"):
            with gr.Row():
                with gr.Column():
                    seg_image = gr.Image(type="pil", image_mode="RGB", label="Image", sources=["upload", "clipboard"],
                                         elem_id="segment-image")
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
            seg_button.click(on_segment, [seg_image, expressions, tiling, threshold], [overlay, table, answer_text])
            expressions.submit(on_segment, [seg_image, expressions, tiling, threshold], [overlay, table, answer_text])
        with gr.Tab("Chat", elem_id="chat-tab"):
            history = gr.State([])
            with gr.Row():
                chat_image = gr.Image(type="pil", image_mode="RGB", label="Image", sources=["upload", "clipboard"],
                                      elem_id="chat-image")
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
            send.click(on_chat, [chat_image, question, history, chatbot], [question, history, chatbot])
            question.submit(on_chat, [chat_image, question, history, chatbot], [question, history, chatbot])
            clear.click(on_clear, None, [chatbot, history])
            # A new image starts a new conversation: the history refers to the old one. (The question box is left
            # alone: a question typed while the upload finishes must not be wiped.)
            chat_image.change(on_clear, None, [chatbot, history])
    demo.queue(default_concurrency_limit=1)  # requests wait in Gradio's queue rather than on the lock
    return demo


def launch_demo(model_path: str, host: str = "127.0.0.1", port: int | None = None, dtype: str = "auto",
                cpu: bool = False, block: bool = True, max_new_tokens: int = 128):
    """Load `model_path` and serve the demo on http://host:port (loopback by default, never a share link)."""
    gr = import_gradio()
    from .loading import load_model

    model, processor = load_model(model_path, dtype, cpu)
    demo = build_demo(model, processor, title=f"MLLMSeg: {Path(model_path).name or model_path}",
                      max_new_tokens=max_new_tokens)
    # quiet: Gradio's banner suggests `share=True`, which this demo does not offer; we print the URL ourselves.
    launch_kwargs = dict(server_name=host, server_port=port, share=False, inbrowser=False,
                         prevent_thread_lock=True, show_error=True, quiet=True)
    params = inspect.signature(gr.Blocks.launch).parameters
    optional = {"ssr_mode": False, "mcp_server": False, "theme": _local_theme(gr)}  # newer gradio versions only
    launch_kwargs.update({k: v for k, v in optional.items() if k in params})
    # Gradio checks its own URL after starting; a proxy from the environment must not see that request.
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY", ""), "127.0.0.1", "localhost", host]))
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = no_proxy
    _, local_url, _ = demo.launch(**launch_kwargs)
    print(f"MLLMSeg demo running on {local_url} (Ctrl-C stops it)", flush=True)
    if block:
        demo.block_thread()  # until Ctrl-C, which closes the server
    return demo


__all__ = ["DEFAULT_MODEL", "build_demo", "launch_demo", "segment_image", "chat_turn", "split_expressions",
           "import_gradio"]

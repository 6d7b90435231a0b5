"""Image URLs: fetched (with a timeout, a size cap and the URL named in every error) only when not offline; in
offline mode (`HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE`) refused before any connection.

Everything runs on loopback: a local `http.server` serves the PNG, and "was a connection attempted?" is read from
a listening socket's accept queue (the kernel completes a loopback handshake before `connect` returns, so an
attempted connection is always waiting there, without any sleep)."""
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from mllmseg.loading import read_image
from mllmseg.remote_code import image_processing_mllmseg as ipm
from mllmseg.remote_code.image_processing_mllmseg import (
    ImageLoadError,
    ImageTooLargeError,
    MLLMSegImageProcessor,
    load_image,
)

from .conftest import REPO_ROOT


def png_bytes(size=(37, 23), seed=0) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


class SilentListener:
    """A socket that listens on loopback but never accepts or answers: `attempted()` says whether anyone
    connected."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/photo.png"

    def attempted(self) -> bool:
        self.sock.setblocking(False)
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return False
        conn.close()
        return True


@pytest.fixture
def listening_socket():
    listener = SilentListener()
    yield listener
    listener.sock.close()


@pytest.fixture
def online(monkeypatch):
    """Offline mode off for this test (conftest turns it on for the whole suite), no proxy for loopback."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def http_server():
    """A local HTTP server: /photo.png is a PNG, /notes.png plain text, anything else 404. Counts requests."""
    body = png_bytes()
    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            if self.path == "/photo.png":
                payload, kind, status = body, "image/png", 200
            elif self.path == "/notes.png":
                payload, kind, status = b"not an image at all", "text/plain", 200
            elif self.path == "/moved.png":
                self.send_response(302)
                self.send_header("Location", "/photo.png")
                self.end_headers()
                return
            else:
                payload, kind, status = b"missing", "text/plain", 404
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.base = f"http://127.0.0.1:{server.server_address[1]}"
    server.png = body
    server.requests = requests
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_offline_refuses_a_url_before_connecting(listening_socket, monkeypatch, variable):
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, "1")
    with pytest.raises(ImageLoadError, match="offline") as error:
        load_image(listening_socket.url)
    assert listening_socket.url in str(error.value) and variable in str(error.value)
    with pytest.raises(ImageLoadError, match="offline"):  # the processor and the CLI's reader take the same path
        MLLMSegImageProcessor()([listening_socket.url])
    with pytest.raises(ImageLoadError, match="offline"):
        read_image(listening_socket.url)
    assert not listening_socket.attempted()


def test_offline_cli_segment_refuses_a_url_in_one_line_without_connecting(listening_socket, tmp_path):
    """`mllmseg segment MODEL URL ...` in a fresh process with HF_HUB_OFFLINE=1: exit 2, one line naming the URL,
    no connection. (The image is read before the model loads, so the model folder only needs a config.json.)"""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "mllmseg"}))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT), HF_HOME=str(tmp_path / "hf"))
    env.pop("TRANSFORMERS_OFFLINE", None)
    result = subprocess.run([sys.executable, "-m", "mllmseg", "segment", str(model), listening_socket.url, "the dog"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mllmseg segment: error:"), result.stderr
    assert listening_socket.url in lines[0] and "offline" in lines[0]
    assert not listening_socket.attempted()


def test_online_a_url_is_fetched(online, http_server):
    url = http_server.base + "/photo.png"
    expected = np.asarray(Image.open(io.BytesIO(http_server.png)).convert("RGB"))
    assert np.array_equal(np.asarray(load_image(url)), expected)
    assert np.array_equal(np.asarray(read_image(url)), expected)  # the CLI's reader (segment, chat)
    out = MLLMSegImageProcessor(tiling="single", tile_size=28)([url])
    assert out["original_sizes"].tolist() == [[23, 37]]
    assert np.array_equal(np.asarray(load_image(http_server.base + "/moved.png")), expected)  # redirects followed
    assert http_server.requests.count("/photo.png") == 4


def test_online_fetch_errors_name_the_url(online, http_server):
    missing = http_server.base + "/nothing.png"
    with pytest.raises(ImageLoadError, match="404") as error:
        load_image(missing)
    assert missing in str(error.value)
    notes = http_server.base + "/notes.png"
    with pytest.raises(ImageLoadError, match="Cannot decode") as error:
        load_image(notes)
    assert notes in str(error.value)


def test_online_download_size_is_capped(online, http_server, monkeypatch):
    monkeypatch.setattr(ipm, "MAX_URL_BYTES", len(http_server.png) - 1)
    url = http_server.base + "/photo.png"
    with pytest.raises(ImageTooLargeError, match="MAX_URL_BYTES") as error:
        load_image(url)
    assert url in str(error.value)


def test_a_server_that_never_answers_times_out_naming_the_url(online, listening_socket, monkeypatch):
    with pytest.raises(ImageLoadError, match="timed out") as error:
        load_image(listening_socket.url, timeout=0.3)
    assert listening_socket.url in str(error.value)
    assert listening_socket.attempted()  # it did connect: the handshake completed, the answer never came
    # The processor (which passes no timeout) uses the module's default, never "wait forever".
    monkeypatch.setattr(ipm, "URL_TIMEOUT", 0.3)
    with pytest.raises(ImageLoadError, match="timed out"):
        MLLMSegImageProcessor()([listening_socket.url])

"""Helpers for the server tests: a tiny random checkpoint with a trained tokenizer, and servers to talk to."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time

import httpx

TEXT = """Multi-head latent attention compresses the keys and values of every token into one small latent vector.
The mixture of experts routes each token to a few specialised feed-forward networks, plus shared experts.
Hello! How are you today? I am fine, thank you. What is the capital of France? Paris is the capital of France.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Code: def add(a, b): return a + b
Unicode: 数学是科学的语言。 你好，世界！ Ωμέγα, Привет мир, naïve café, 🙂🚀.
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_checkpoint(path, max_position_embeddings: int = 256, seed: int = 0) -> str:
    """A 2-layer random DeepSeek-V2 model whose vocabulary is a byte-level BPE trained on TEXT."""
    from latentmoe import build_model, get_config, save_model
    from latentmoe.tokenizer import train_bpe

    path = os.fspath(path)
    tok = train_bpe([TEXT] * 8, vocab_size=320)
    tok.save(os.path.join(path, "tokenizer"))
    cfg = get_config("tiny", vocab_size=tok.vocab_size, num_hidden_layers=2, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, max_position_embeddings=max_position_embeddings)
    save_model(build_model(cfg, seed=seed), path, tokenizer_dir=os.path.join(path, "tokenizer"))
    return path


def wait_healthy(base_url: str, proc: subprocess.Popen | None = None, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(base_url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError("the server did not become healthy")


@contextlib.contextmanager
def server_process(model_dir, *args: str, log_path=None):
    """`latentmoe serve` in a subprocess on a free port; yields its base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "latentmoe", "serve", os.fspath(model_dir), "--port", str(port),
           "--log-level", "warning", *args]
    log = open(log_path or os.devnull, "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@contextlib.contextmanager
def server_thread(app):
    """A real uvicorn server for `app` in a thread of this process; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.02)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=20)

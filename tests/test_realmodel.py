"""chat.py against a real model server: llama-cpp-python serving Gemma 3 270M on 127.0.0.1.

Install them with `bash tests/setup_realmodel.sh` (once; cached in ~/.cache/chat-py).
Without them these tests skip, unless CHAT_PY_REQUIRE_REALMODEL is set (as CI does).
The assertions are about behaviour (exit codes, bounded replies, prompt exits), never
about the model's words.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from conftest import CHAT

pytestmark = pytest.mark.realmodel

CACHE = Path(os.environ.get("CHAT_PY_CACHE", Path.home() / ".cache" / "chat-py"))
SERVER_PYTHON = CACHE / "realmodel" / "bin" / "python"
MODEL = CACHE / "gemma-3-270m-q4_k_m.gguf"
LONG_QUESTION = "Count from 1 to 200, one number per line."


@pytest.fixture(scope="module")
def model_url(tmp_path_factory):
    if not (SERVER_PYTHON.exists() and MODEL.exists()):
        reason = (f"no local model server in {CACHE}: run `bash tests/setup_realmodel.sh` "
                  "to install llama-cpp-python[server] and Gemma 3 270M")
        if os.environ.get("CHAT_PY_REQUIRE_REALMODEL"):
            pytest.fail(reason)
        pytest.skip(reason)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path_factory.mktemp("llama") / "server.log"
    with open(log, "wb") as log_file:
        server = subprocess.Popen(
            [str(SERVER_PYTHON), "-m", "llama_cpp.server", "--model", str(MODEL), "--host", "127.0.0.1",
             "--port", str(port), "--n_ctx", "2048", "--verbose", "False",
             # the chat template inside this GGUF makes the server reply with no tokens at all
             "--chat_format", "gemma"],
            stdout=log_file, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                pytest.fail(f"the model server exited with {server.returncode}:\n{log.read_text()[-2000:]}")
            try:
                if requests.get(url + "/models", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the model server did not start within 180 s")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()


def chat(url, *args, timeout=300):
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(CHAT), "--base-url", url, *args],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                          env={"PATH": os.environ["PATH"]})
    done.seconds = time.monotonic() - started
    return done


def test_plain_question(model_url):
    done = chat(model_url, "--max-tokens", "60", "What is the capital of France?")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and done.stdout.endswith("\n")
    assert "Traceback" not in done.stderr


def test_stream(model_url):
    done = chat(model_url, "--stream", "--max-tokens", "60", "Name three colours.")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_system_prompt(model_url):
    done = chat(model_url, "-s", "You answer in one short sentence.", "--max-tokens", "60", "What is rain?")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


@pytest.mark.parametrize("stream", [[], ["--stream"]])
def test_max_tokens_bounds_the_reply(model_url, stream):
    done = chat(model_url, *stream, "--max-tokens", "5", LONG_QUESTION, timeout=120)
    assert done.returncode == 0, done.stderr
    # five tokens are a few words at most; the model stopped because of the limit
    assert 0 < len(done.stdout.split()) <= 8 and len(done.stdout) < 80, done.stdout
    assert "warning: the reply was cut off at the token limit" in done.stderr
    assert done.seconds < 60


def test_the_server_ignores_max_completion_tokens(model_url):
    """Why the contract sends max_tokens to servers other than OpenAI's: this one ignores the newer
    name, so a reply asked to stop at 5 tokens would run on (here: past 40 deltas, then we hang up)."""
    body = {"model": "any", "messages": [{"role": "user", "content": LONG_QUESTION}],
            "max_completion_tokens": 5, "stream": True}
    deltas = 0
    with requests.post(model_url + "/chat/completions", json=body, stream=True, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith(b"data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                deltas += bool(delta.get("content"))
                if deltas > 40:
                    break
    assert deltas > 40


def test_ctrl_c_mid_stream(model_url):
    process = subprocess.Popen([sys.executable, str(CHAT), "--base-url", model_url, "--stream",
                                LONG_QUESTION],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={"PATH": os.environ["PATH"]})
    try:
        first = process.stdout.read(1)  # the reply has started
        assert first
        process.send_signal(signal.SIGINT)
        started = time.monotonic()
        out, err = process.communicate(timeout=10)
    finally:
        process.kill()
    assert process.returncode == 130
    assert time.monotonic() - started < 5
    assert err == b"\n"
    assert (first + out).strip()  # the partial reply stays on stdout

"""chat.py against real model servers on 127.0.0.1, each serving Gemma 3 270M: llama-cpp-python's
server, and llama.cpp's own C++ llama-server. Every test runs on both.

Install them with `bash tests/setup_realmodel.sh` (once; cached in ~/.cache/chat-py).
Without them these tests skip, unless CHAT_PY_REQUIRE_REALMODEL is set (as CI does).
The assertions are about behaviour (exit codes, bounded replies, what the server counted),
never about the model's words. Where the two servers differ on the wire, the expectation
says which does what.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from PIL import Image

from conftest import CHAT, child_env

pytestmark = pytest.mark.realmodel

CACHE = Path(os.environ.get("CHAT_PY_CACHE", Path.home() / ".cache" / "chat-py"))
MODEL = CACHE / "gemma-3-270m-q4_k_m.gguf"
ALIAS = "gemma-3-270m"
LONG_QUESTION = "Count from 1 to 200, one number per line."


def llama_cpp_python(port: int) -> list[str]:
    # --chat_format gemma: with the chat template stored in this GGUF, the server answers
    # every chat request with no tokens at all.
    return [str(CACHE / "realmodel" / "bin" / "python"), "-m", "llama_cpp.server", "--model", str(MODEL),
            "--model_alias", ALIAS, "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
            "--verbose", "False", "--chat_format", "gemma"]


def llama_server(port: int) -> list[str]:
    # The GGUF carries no chat template llama-server can use, and its ChatML fallback echoes the
    # prompt back; --no-jinja makes "gemma" the name of a built-in template, not a Jinja text.
    return [str(CACHE / "llama-server" / "llama-server"), "-m", str(MODEL), "--no-jinja",
            "--chat-template", "gemma", "--host", "127.0.0.1", "--port", str(port), "-c", "2048",
            "--alias", ALIAS]


SERVERS = {"llama-cpp-python": llama_cpp_python, "llama-server": llama_server}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module", params=list(SERVERS))
def server(request, tmp_path_factory):
    """A real model server, started for this module and stopped by its PID at the end."""
    command = SERVERS[request.param](free_port())
    if not (Path(command[0]).exists() and MODEL.exists()):
        reason = (f"no {request.param} or model in {CACHE}: run `bash tests/setup_realmodel.sh` "
                  "to install llama-cpp-python[server], llama-server and Gemma 3 270M")
        if os.environ.get("CHAT_PY_REQUIRE_REALMODEL"):
            pytest.fail(reason)
        pytest.skip(reason)
    log = tmp_path_factory.mktemp(request.param) / "server.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{command[command.index('--port') + 1]}/v1"
    try:
        wait_until_ready(process, url, log)
        yield SimpleNamespace(name=request.param, url=url)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def wait_until_ready(process, url, log, seconds=180):
    deadline = time.monotonic() + seconds
    while True:
        if process.poll() is not None:
            pytest.fail(f"the model server exited with {process.returncode}:\n{log.read_text()[-2000:]}")
        try:
            if requests.get(url + "/models", timeout=2).ok:
                return
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"the model server did not start within {seconds} s")
        time.sleep(0.5)


def chat(server, *args, timeout=300):
    """Run chat.py against the server, with the test's own HOME and conversation folder."""
    started = time.monotonic()
    env = child_env(OPENAI_API_KEY="")
    done = subprocess.run([sys.executable, str(CHAT), "--base-url", server.url, *args],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, env=env)
    done.seconds = time.monotonic() - started
    return done


def usage_counts(stderr: str) -> tuple[int, int]:
    match = re.search(r"^usage: (\d+) in, (\d+) out", stderr, re.M)
    assert match, stderr
    return int(match[1]), int(match[2])


def test_plain_question(server):
    done = chat(server, "--max-tokens", "60", "What is the capital of France?")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and done.stdout.endswith("\n") and not done.stdout.endswith("\n\n")
    assert "Traceback" not in done.stderr


def test_stream(server):
    done = chat(server, "--stream", "--max-tokens", "60", "Name three colours.")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    assert "warning: the stream ended" not in done.stderr  # [DONE] or a finish_reason arrived


def test_system_prompt(server):
    done = chat(server, "-s", "You answer in one short sentence.", "--max-tokens", "60", "What is rain?")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


@pytest.mark.parametrize("stream", [[], ["--stream"]])
def test_max_tokens_bounds_the_reply(server, stream):
    done = chat(server, *stream, "--max-tokens", "5", LONG_QUESTION, timeout=120)
    assert done.returncode == 0, done.stderr
    # five tokens are a few words at most; the model stopped because of the limit
    assert 0 < len(done.stdout.split()) <= 8 and len(done.stdout) < 80, done.stdout
    assert "warning: the reply was cut off at the token limit" in done.stderr
    assert done.seconds < 60


def test_max_completion_tokens_alone(server):
    """Why --max-tokens goes out as max_tokens to servers other than OpenAI's: llama-cpp-python
    ignores the newer name, so a reply asked to stop at 5 tokens runs on (past 40 deltas, then we
    hang up); llama-server honours both names."""
    body = {"model": ALIAS, "messages": [{"role": "user", "content": LONG_QUESTION}],
            "max_completion_tokens": 5, "stream": True}
    deltas = 0
    with requests.post(server.url + "/chat/completions", json=body, stream=True, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith(b"data: {"):
                choices = json.loads(line[6:])["choices"]
                deltas += bool(choices and choices[0]["delta"].get("content"))
                if deltas > 40:
                    break
    if server.name == "llama-server":
        assert 0 < deltas <= 5
    else:
        assert deltas > 40


def test_models_lists_the_alias(server):
    done = chat(server, "--models")
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{ALIAS}\n", "")


def test_usage_of_a_whole_reply(server):
    done = chat(server, "-u", "--max-tokens", "8", "Say hello.")
    assert done.returncode == 0, done.stderr
    prompt, completion = usage_counts(done.stderr)
    assert prompt > 3 and 0 < completion <= 8


def test_usage_of_a_stream(server):
    """-u asks a stream for usage with stream_options.include_usage: llama-server sends it in a last
    chunk with no choices; llama-cpp-python ignores the field, and chat.py says so."""
    done = chat(server, "-u", "--stream", "--max-tokens", "8", "Say hello.")
    assert done.returncode == 0, done.stderr
    if server.name == "llama-server":
        prompt, completion = usage_counts(done.stderr)
        assert prompt > 3 and 0 < completion <= 8
    else:
        assert "usage: not reported by the server\n" in done.stderr


@pytest.mark.parametrize("stream", [[], ["--stream"]])
def test_a_continued_conversation_sends_the_earlier_turn(server, stream):
    first = chat(server, *stream, "--max-tokens", "20", "My name is Ada Lovelace and I like engines.")
    assert first.returncode == 0, first.stderr
    alone = chat(server, "--no-save", "-u", "--max-tokens", "10", "What is my name?")
    going_on = chat(server, "-c", "-u", "--max-tokens", "10", "What is my name?")
    assert going_on.returncode == 0, going_on.stderr
    # The server counted the earlier question and answer in the prompt it was sent.
    assert usage_counts(going_on.stderr)[0] > usage_counts(alone.stderr)[0] + 10
    [saved] = Path(os.environ["CHAT_PY_HOME"]).glob("*.jsonl")
    turns = [json.loads(line) for line in saved.read_text().splitlines()]
    assert [turn["user"]["content"] for turn in turns] == [
        "My name is Ada Lovelace and I like engines.", "What is my name?"]
    answer = turns[0]["assistant"]  # saved as shown: stdout is the answer and one newline
    assert first.stdout == (answer if answer.endswith("\n") else answer + "\n")


def test_any_field_with_o(server):
    runs = [chat(server, "-o", "seed", "1", "--temperature", "0", "--max-tokens", "12", "--no-save",
                 "Name a fruit.") for _ in range(2)]
    assert [run.returncode for run in runs] == [0, 0], runs[0].stderr
    assert runs[0].stdout == runs[1].stdout  # greedy decoding: the same words twice


def test_an_image_for_a_text_only_model(server, tmp_path):
    """llama-server refuses a picture its model cannot see (500, image input is not supported);
    llama-cpp-python answers the text and drops the picture."""
    Image.new("RGB", (64, 64), "red").save(tmp_path / "red.png")
    done = chat(server, "--image", str(tmp_path / "red.png"), "--max-tokens", "10", "What is this?")
    if server.name == "llama-server":
        assert done.returncode == 1 and done.stdout == ""
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and done.stderr.splitlines()[-1] == errors[0]
        assert "image input is not supported" in errors[0] and len(errors[0]) <= 300
    else:
        assert done.returncode == 0 and done.stdout.strip(), done.stderr


def test_ctrl_c_mid_stream(server):
    env = child_env(OPENAI_API_KEY="")
    process = subprocess.Popen([sys.executable, str(CHAT), "--base-url", server.url, "--stream",
                                LONG_QUESTION],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=env)
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
    assert not Path(os.environ["CHAT_PY_HOME"]).exists()  # an interrupted reply is not saved

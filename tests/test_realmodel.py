"""chat.py against real model servers on 127.0.0.1, each serving Gemma 3 270M: llama-cpp-python's
server, and llama.cpp's own C++ llama-server. Every test runs on both.

Install them with `bash tests/setup_realmodel.sh` (once; cached in ~/.cache/chat-py).
Without them these tests skip, unless CHAT_PY_REQUIRE_REALMODEL is set (as CI does).
The assertions are about behaviour (exit codes, bounded replies, what the server counted,
the JSON's fields), never about the model's words. Where the two servers differ on the wire,
the expectation says which does what.
"""

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from conftest import saved, write_settings
from PIL import Image
from test_files import pdf_bytes, wav_bytes

pytestmark = pytest.mark.realmodel

CACHE = Path(os.environ.get("CHAT_PY_CACHE", Path.home() / ".cache" / "chat-py"))
MODEL = CACHE / "gemma-3-270m-q4_k_m.gguf"
ALIAS = "gemma-3-270m"
LONG_QUESTION = "Count from 1 to 200, one number per line."
WEATHER_TOOL = json.dumps(
    [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
)


# Greedy decoding where a grammar shapes the reply: sampled, Gemma 3 270M sometimes loops
# inside a JSON string ("[10] [10] ...") until the token limit, about one run in 40.
GREEDY = ("--temperature", "0", "-o", "seed", "1")


def llama_cpp_python(port: int, chat_format: str = "gemma") -> list[str]:
    # --chat_format gemma: with the chat template stored in this GGUF, the server answers
    # every chat request with no tokens at all.
    return [
        str(CACHE / "realmodel" / "bin" / "python"),
        "-m",
        "llama_cpp.server",
        "--model",
        str(MODEL),
        "--model_alias",
        ALIAS,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "2048",
        "--verbose",
        "False",
        "--chat_format",
        chat_format,
    ]


def llama_server(port: int) -> list[str]:
    # The GGUF carries no chat template llama-server can use, and its ChatML fallback echoes the
    # prompt back; --no-jinja makes "gemma" the name of a built-in template, not a Jinja text.
    return [
        str(CACHE / "llama-server" / "llama-server"),
        "-m",
        str(MODEL),
        "--no-jinja",
        "--chat-template",
        "gemma",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-c",
        "2048",
        "--alias",
        ALIAS,
    ]


SERVERS = {"llama-cpp-python": llama_cpp_python, "llama-server": llama_server}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(name: str, command: list[str], folder: Path):
    """A real model server, started now and stopped by its PID when the generator ends."""
    if not (Path(command[0]).exists() and MODEL.exists()):
        reason = (
            f"no {name} or model in {CACHE}: run `bash tests/setup_realmodel.sh` "
            "to install llama-cpp-python[server], llama-server and Gemma 3 270M"
        )
        if os.environ.get("CHAT_PY_REQUIRE_REALMODEL"):
            pytest.fail(reason)
        pytest.skip(reason)
    log = folder / "server.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    port = command[command.index("--port") + 1]
    try:
        wait_until_ready(process, f"http://127.0.0.1:{port}/v1", log)
        yield SimpleNamespace(
            name=name, url=f"http://127.0.0.1:{port}/v1", port=port, process=process
        )
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module", params=list(SERVERS))
def server(request, tmp_path_factory):
    yield from start_server(
        request.param, SERVERS[request.param](free_port()), tmp_path_factory.mktemp(request.param)
    )


@pytest.fixture(scope="module")
def function_calling_server(tmp_path_factory):
    """llama-cpp-python with its chatml-function-calling format: it constrains the reply to a
    tool call with a grammar when tool_choice names a function."""
    yield from start_server(
        "llama-cpp-python",
        llama_cpp_python(free_port(), "chatml-function-calling"),
        tmp_path_factory.mktemp("function-calling"),
    )


def wait_until_ready(process, url, log, seconds=180):
    deadline = time.monotonic() + seconds
    while True:
        if process.poll() is not None:
            pytest.fail(
                f"the model server exited with {process.returncode}:\n{log.read_text()[-2000:]}"
            )
        try:
            if requests.get(url + "/models", timeout=2).ok:
                return
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"the model server did not start within {seconds} s")
        time.sleep(0.5)


@pytest.fixture
def ask_model(cli, server):
    """chat.py (in this process) against the real server, with no key."""

    def run(*args, **options):
        options.setdefault("key", None)
        return cli("--base-url", server.url, *args, **options)

    return run


def usage_counts(stderr: str) -> tuple[int, int]:
    match = re.search(r"^usage: (\d+) in, (\d+) out", stderr, re.MULTILINE)
    assert match, stderr
    return int(match[1]), int(match[2])


def test_plain_question(ask_model):
    done = ask_model("--max-tokens", "60", "What is the capital of France?")
    assert done.code == 0, done.err
    assert done.out.strip() and done.out.endswith("\n") and not done.out.endswith("\n\n")


def test_stream_and_system_prompt(ask_model, server):
    done = ask_model(
        "--stream",
        "-s",
        "You answer in one short sentence.",
        "--max-tokens",
        "60",
        "Name three colours.",
    )
    assert done.code == 0, done.err
    assert done.out.strip()
    assert "warning: the stream ended" not in done.err  # [DONE] or a finish_reason arrived
    [[turn]] = saved().values()
    # llama-server names its --alias; llama-cpp-python's stream echoes the model asked for
    answered_by = ALIAS if server.name == "llama-server" else "gpt-5.4-mini"
    assert (turn["system"], turn["answered_by"]) == (
        "You answer in one short sentence.",
        answered_by,
    )


@pytest.mark.parametrize("stream", [[], ["--stream"]])
def test_max_tokens_bounds_the_reply(ask_model, stream):
    done = ask_model(*stream, "--max-tokens", "5", LONG_QUESTION)
    assert done.code == 0, done.err
    # five tokens are a few words at most; the model stopped because of the limit
    assert 0 < len(done.out.split()) <= 8 and len(done.out) < 80, done.out
    assert "warning: the reply was cut off at the token limit" in done.err


def test_max_completion_tokens_alone(server):
    """Why --max-tokens goes out as max_tokens to servers other than OpenAI's: llama-cpp-python
    ignores the newer name, so a reply asked to stop at 5 tokens runs on (past 40 deltas, then we
    hang up); llama-server honours both names."""
    body = {
        "model": ALIAS,
        "messages": [{"role": "user", "content": LONG_QUESTION}],
        "max_completion_tokens": 5,
        "stream": True,
    }
    deltas = 0
    with requests.post(
        server.url + "/chat/completions", json=body, stream=True, timeout=60
    ) as response:
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


def test_models_lists_the_alias(ask_model):
    done = ask_model("--models")
    assert (done.code, done.out, done.err) == (0, f"{ALIAS}\n", "")


@pytest.mark.parametrize("stream", [[], ["--stream"]])
def test_usage(ask_model, server, stream):
    """-u asks a stream for usage with stream_options.include_usage: llama-server sends it in a last
    chunk with no choices; llama-cpp-python ignores the field, and chat.py says so."""
    done = ask_model("-u", *stream, "--max-tokens", "8", "Say hello.")
    assert done.code == 0, done.err
    if stream and server.name == "llama-cpp-python":
        assert "usage: not reported by the server\n" in done.err
    else:
        prompt, completion = usage_counts(done.err)
        assert prompt > 3 and 0 < completion <= 8


@pytest.mark.parametrize("stream", [[], ["--stream"]])
def test_a_continued_conversation_sends_the_earlier_turn(ask_model, stream):
    first = ask_model(*stream, "--max-tokens", "20", "My name is Ada Lovelace and I like engines.")
    assert first.code == 0, first.err
    alone = ask_model("--no-save", "-u", "--max-tokens", "10", "What is my name?")
    going_on = ask_model("-c", "-u", "--max-tokens", "10", "What is my name?")
    assert going_on.code == 0, going_on.err
    # The server counted the earlier question and answer in the prompt it was sent.
    assert usage_counts(going_on.err)[0] > usage_counts(alone.err)[0] + 10
    [turns] = saved().values()
    assert [turn["user"]["content"] for turn in turns] == [
        "My name is Ada Lovelace and I like engines.",
        "What is my name?",
    ]
    answer = turns[0]["assistant"]  # saved as shown: stdout is the answer and one newline
    assert first.out == (answer if answer.endswith("\n") else answer + "\n")


def test_any_field_with_o(ask_model):
    runs = [
        ask_model(
            "-o",
            "seed",
            "1",
            "--temperature",
            "0",
            "--max-tokens",
            "12",
            "--no-save",
            "Name a fruit.",
        )
        for _ in range(2)
    ]
    assert [run.code for run in runs] == [0, 0], runs[0].err
    assert runs[0].out == runs[1].out  # greedy decoding: the same words twice


def test_an_image_for_a_text_only_model(ask_model, server, tmp_path):
    """llama-server refuses a picture its model cannot see (500, image input is not supported);
    llama-cpp-python answers the text and drops the picture."""
    Image.new("RGB", (64, 64), "red").save(tmp_path / "red.png")
    done = ask_model("--image", "red.png", "--max-tokens", "10", "--retries", "0", "What is this?")
    if server.name == "llama-server":
        assert (done.code, done.out) == (1, "")
        assert done.err.startswith("error: HTTP 500 Internal Server Error: ")
        assert "image input is not supported" in done.err and done.err.count("\n") == 1
    else:
        assert done.code == 0 and done.out.strip(), done.err


# llama-cpp-python checks a request against its pydantic models, which know only text and image
# parts, and answers with their errors in a 500: the line shows their start, the hint the rest.
VALIDATION_ERRORS = (
    "HTTP 500 Internal Server Error: 15 validation errors: {'type': 'literal_error', "
    "'loc': ('body', 'messages', 0, 'ChatCompletionRequestSystemMessage', 'role'), 'msg': "
    "\"Input should be 'system'\", 'input': 'user', 'ctx': {'expected': \"'system'\"}} {'type': "
)


@pytest.mark.parametrize(
    "name, data, errors",
    [
        (
            "paper.pdf",
            pdf_bytes(),
            {
                "llama-server": "HTTP 400 Bad Request: unsupported content[].type",
                "llama-cpp-python": f"{VALIDATION_ERRORS}'st…",
            },
        ),
        (
            "tone.wav",
            wav_bytes(),
            {
                "llama-server": "HTTP 500 Internal Server Error: audio input is not supported - "
                "hint: if this is unexpected, you may need to provide the mmproj",
                "llama-cpp-python": f"{VALIDATION_ERRORS}'string…",
            },
        ),
    ],
)
def test_a_document_or_a_recording_for_a_text_only_model(
    ask_model, server, tmp_path, name, data, errors
):
    """Neither server takes a PDF or a WAV for Gemma 3 270M, each refusing in its own words;
    chat.py adds the hint naming the part."""
    (tmp_path / name).write_bytes(data)
    done = ask_model("-f", name, "--max-tokens", "10", "--retries", "0", "What is this?")
    hint = {"paper.pdf": "PDF files", "tone.wav": "audio"}[name]
    error = f"error: {errors[server.name]} (this server may not take {hint})\n"
    assert (done.code, done.out, done.err) == (1, "", error)


@pytest.mark.parametrize(
    "spec, fields",
    [
        ("name, age int", {"name": str, "age": int}),
        (
            (
                '{"type": "object", "properties": {"colour": '
                '{"type": "string", "enum": ["red", "green", "blue"]}}, '
                '"required": ["colour"], "additionalProperties": false}'
            ),
            {"colour": str},
        ),
    ],
)
@pytest.mark.parametrize("stream", [[], ["--stream"]])
def test_schema_gives_json_with_exactly_the_fields(ask_model, server, spec, fields, stream):
    """llama-server takes OpenAI's json_schema form; llama-cpp-python rejects it (HTTP 500) and
    honours the json_object form with the schema, which chat.py sends next (-v says so)."""
    done = ask_model(
        "--schema", spec, *stream, *GREEDY, "-v", "--max-tokens", "60", "Invent a person."
    )
    assert done.code == 0, done.err[-2000:]
    reply = json.loads(done.out)
    assert {name: type(value) for name, value in reply.items()} == fields
    if "colour" in fields:
        assert reply["colour"] in ("red", "green", "blue")
    fell_back = 'sending it as {"type": "json_object"' in done.err
    assert fell_back == (server.name == "llama-cpp-python")
    [[turn]] = saved().values()
    assert json.loads(turn["assistant"]) == reply


@pytest.mark.parametrize("stream", [[], ["--stream"]])
def test_a_real_tool_call(cli, function_calling_server, stream):
    done = cli(
        "--base-url",
        function_calling_server.url,
        *stream,
        *GREEDY,
        "--max-tokens",
        "60",
        "-o",
        "tools",
        WEATHER_TOOL,
        "-o",
        "tool_choice",
        '{"type": "function", "function": {"name": "get_weather"}}',
        "Weather in Paris?",
        key=None,
    )
    assert (done.code, done.err) == (0, ""), done.err
    [line] = done.out.splitlines()
    call = json.loads(line)
    assert call["name"] == "get_weather" and isinstance(call["arguments"]["city"], str)


def test_tools_with_the_chat_formats_of_these_tests(ask_model, server):
    """Neither server of these tests makes tool calls: llama-server runs with --no-jinja, which
    takes no tools (a 500, in one line); llama-cpp-python's gemma format ignores them and answers
    in text."""
    done = ask_model(
        "-o", "tools", WEATHER_TOOL, "--retries", "0", "--max-tokens", "20", "Weather in Paris?"
    )
    if server.name == "llama-server":
        assert (done.code, done.out) == (1, "")
        assert (
            done.err == "error: HTTP 500 Internal Server Error: tools param requires --jinja flag\n"
        )
    else:
        assert done.code == 0 and done.out.strip(), done.err
        assert not done.out.startswith('{"name": ')


def test_a_full_context_says_how_to_go_on(ask_model, server, tmp_path):
    """A conversation longer than the 2,048-token context: both servers refuse it with HTTP 400,
    each in its own words, and chat.py adds the way out (a smaller --max-tokens only where the
    request set one, or the server counts the completion's share: llama-cpp-python does)."""
    budget = ", or set a smaller --max-tokens" if server.name == "llama-cpp-python" else ""
    (tmp_path / "long.txt").write_text("word " * 3000)
    done = ask_model("--chat", "big", "-f", "long.txt", "Summarise.")
    assert (done.code, done.out) == (1, "")
    assert done.err.startswith("error: HTTP 400 Bad Request: ")
    assert done.err.endswith(
        f"(the question alone fills the model's context: shorten the question{budget})\n"
    )
    assert ask_model("--chat", "big", "--max-tokens", "5", "Hi.").code == 0
    done = ask_model("--chat", "big", "-f", "long.txt", "Summarise.")
    assert done.err.endswith(
        "(this conversation's 1 turn and the question fill the model's context: "
        f"start a new conversation (no -c){budget})\n"
    )
    done = ask_model("--chat", "big", "-f", "long.txt", "--max-tokens", "100", "Summarise.")
    assert done.err.endswith(" (no -c), or set a smaller --max-tokens)\n")


CUT_OFF = "warning: the reply was cut off at the token limit (finish_reason: length)\n"


def test_configured_through_the_settings_file(cli, server, tmp_path):
    """The server, chosen once in the user's own settings file: no --base-url, in any folder; a
    .env there that names another server is ignored with a warning."""
    write_settings(f"OPENAI_BASE_URL={server.url}\nOPENAI_MODEL={ALIAS}\n")
    done = cli("--max-tokens", "5", "Hi.", key=None)
    assert done.code == 0 and done.out.strip(), done.err
    assert done.err in ("", CUT_OFF)  # 5 tokens may not be the whole answer
    (tmp_path / ".env").write_text(
        f"OPENAI_BASE_URL={server.url.replace('127.0.0.1', '0.0.0.0')}\n"
    )
    done = cli("--max-tokens", "5", "-c", "Again.", key=None)
    assert done.code == 0 and done.out.strip(), done.err
    assert done.err.startswith("warning: .env: OPENAI_BASE_URL ignored: a .env sets only the key")
    [turns] = saved().values()
    assert [turn["base_url"] for turn in turns] == [server.url, server.url]
    assert [turn["model"] for turn in turns] == [ALIAS, ALIAS]


def test_ctrl_c_mid_stream(server, cli):
    process = cli.process("--base-url", server.url, "--stream", LONG_QUESTION, key=None, start=True)
    process.stdin.close()
    process.stdin = None  # nothing more to send
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
    assert saved() == {}  # an interrupted reply is not saved


def test_https_to_a_plain_http_server_is_said_at_once(cli, server):
    """llama-cpp-python (uvicorn) answers the ClientHello in plain HTTP; llama-server waits for
    more, silent: its answer is the connect timeout's (--timeout 3 makes it 3 s)."""
    started = time.monotonic()
    done = cli(
        "--base-url", server.url.replace("http:", "https:"), "--timeout", "3", "Hi.", key=None
    )
    silent = server.name == "llama-server"
    assert time.monotonic() - started < (5 if silent else 2)
    assert (done.code, done.out) == (3, "")
    assert done.err == (
        f"error: 127.0.0.1:{server.port} did not answer in TLS{' within 3 s' if silent else ''}: "
        f"is it a plain-HTTP server? try {server.url}\n"
    )


def test_llama_server_killed_mid_stream(cli, tmp_path):
    """SIGKILL while the reply streams: the text so far stays, exit 3, nothing saved."""
    [name] = [name for name in SERVERS if name == "llama-server"]
    starting = start_server(name, SERVERS[name](free_port()), tmp_path)
    server = next(starting)
    try:
        process = cli.process(
            "--base-url", server.url, "--stream", LONG_QUESTION, key=None, start=True
        )
        process.stdin.close()
        process.stdin = None
        try:
            first = process.stdout.read(1)  # the reply has started
            server.process.kill()
            out, err = process.communicate(timeout=30)
        finally:
            process.kill()
    finally:
        starting.close()
    assert first and (first + out).strip()
    assert (process.returncode, err.decode()) == (
        3,
        f"error: the connection to 127.0.0.1:{server.port} broke off mid-reply\n",
    )
    assert saved() == {}

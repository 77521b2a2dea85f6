"""Today's models and servers: reasoning, -o for any field, -u for usage, --models, -f files,
and the wire fixes found in the field. Each field is checked on the wire, present only when
asked. chat.main() runs in this process; only the unreadable-file test needs a real one."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from typing import ClassVar

import pytest
from conftest import (
    CHAT,
    END_CHUNKS,
    FAKE_KEY,
    SSE_HEAD,
    chunk,
    chunk_of,
    completion,
    json_response,
    missing_key_error,
    saved,
    sse_response,
)

import chat

DIM, NORMAL = "\x1b[2m", "\x1b[0m"
LIMIT_WARNING = (
    "warning: the token limit went to reasoning{} before any answer: raise --max-tokens "
    "or lower --reasoning-effort\n"
)


def events(*deltas: dict, finish: str = "stop", usage: dict | None = None) -> bytes:
    """A whole streamed reply: one event per delta dict, a finish_reason, an optional usage
    chunk (no choices, as OpenAI sends it), [DONE]."""
    data = b"".join(chunk(**delta) for delta in deltas) + chunk(finish_reason=finish)
    if usage:
        data += b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n"
    return sse_response(data + b"data: [DONE]\n\n")


def curl_body(out: str) -> dict:
    """The JSON body of a --curl command."""
    return json.loads(out.partition("<<'JSON'\n")[2].removesuffix("\nJSON\n"))


class StillSpinner:
    """The spinner without its thread, for runs whose stderr is a terminal: no frame appears
    at a moment that depends on the machine's load."""

    def __init__(self, stream, color: bool):
        self.stream = stream

    def above(self, line: str) -> None:
        self.stream.write(line + "\n")

    def stop(self) -> None:
        pass


class TestReasoning:
    THINKING: ClassVar[list] = [
        {"reasoning_content": "Let me "},
        {"reasoning_content": "think."},
        {"content": "The "},
        {"content": "answer."},
    ]

    @pytest.mark.parametrize(
        "args, stderr_tty, env, err",
        [
            ((), False, {}, ""),
            (("--reasoning", "show"), False, {}, "reasoning:\nLet me think.\n\n"),
            ((), True, {}, f"{DIM}Let me think.{NORMAL}\n\n"),
            ((), True, {"NO_COLOR": "1"}, "reasoning:\nLet me think.\n\n"),
            (("--reasoning", "hide"), True, {}, ""),
        ],
        ids=[
            "pipe-hidden",
            "pipe-show-labelled",
            "tty-dimmed",
            "tty-no-color-labelled",
            "tty-hide",
        ],
    )
    def test_shown_on_stderr_only_when_wanted_and_never_on_stdout(
        self, cli, server, monkeypatch, args, stderr_tty, env, err
    ):
        monkeypatch.setattr(chat, "Spinner", StillSpinner)
        server.reply(events(*self.THINKING))
        done = cli(
            "--base-url",
            server.url,
            "--stream",
            *args,
            "q",
            env=env,
            ttys=(False, False, stderr_tty),
        )
        assert (done.code, done.out, done.err) == (0, "The answer.\n", err)

    @pytest.mark.parametrize(
        "message, shown",
        [
            ({"reasoning_content": "deepseek style"}, "deepseek style"),
            ({"reasoning": "vllm style"}, "vllm style"),
            ({"reasoning_content": "wins", "reasoning": "loses"}, "wins"),
            ({"reasoning_content": "", "reasoning": "the other"}, "the other"),
            ({"reasoning_content": {"not": "text"}, "reasoning": ["nor", "this"]}, None),
        ],
    )
    def test_whole_replies_carry_reasoning_in_either_field(self, cli, server, message, shown):
        server.reply(json_response(completion("Answer.", **message)))
        done = cli("--base-url", server.url, "--reasoning", "show", "q")
        err = f"reasoning:\n{shown}\n\n" if shown else ""
        assert (done.code, done.out, done.err) == (0, "Answer.\n", err)

    @pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
    def test_either_field_streams(self, cli, server, field):
        server.reply(events({field: "hmm\n"}, {"content": "ok"}))
        done = cli("--base-url", server.url, "--stream", "--reasoning", "show", "q")
        assert (done.code, done.out, done.err) == (0, "ok\n", "reasoning:\nhmm\n\n")

    @pytest.mark.parametrize("stream", [False, True])
    def test_never_saved_nor_sent_back(self, cli, server, stream):
        flag = ["--stream"] if stream else []
        first = (
            events(*self.THINKING)
            if stream
            else json_response(completion("The answer.", reasoning_content="Let me think."))
        )
        server.reply(first, json_response(completion("Again.")))
        assert cli("--base-url", server.url, *flag, "--reasoning", "show", "q1").code == 0
        assert cli("--base-url", server.url, "-c", "q2").code == 0
        assert server.bodies[1]["messages"] == [
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "The answer."},
            {"role": "user", "content": "q2"},
        ]
        [turns] = saved().values()
        assert [turn["assistant"] for turn in turns] == ["The answer.", "Again."]
        assert "think" not in json.dumps(turns)

    def test_reasoning_effort_is_sent_only_when_asked(self, cli, server):
        assert cli("--base-url", server.url, "--reasoning-effort", "minimal", "q").code == 0
        assert cli("--base-url", server.url, "q").code == 0
        assert server.bodies[0]["reasoning_effort"] == "minimal"
        assert "reasoning_effort" not in server.bodies[1]

    DETAILS: ClassVar[dict] = {
        "prompt_tokens": 9,
        "completion_tokens": 64,
        "completion_tokens_details": {"reasoning_tokens": 64},
    }

    @pytest.mark.parametrize(
        "reply, count",
        [
            (
                json_response({**completion("", finish_reason="length"), "usage": DETAILS}),
                " (64 reasoning tokens)",
            ),
            (
                json_response(
                    {
                        **completion(
                            None, finish_reason="length", reasoning_content="still thinking"
                        ),
                        "usage": DETAILS,
                    }
                ),
                " (64 reasoning tokens)",
            ),
            (
                json_response(completion(None, finish_reason="length", reasoning="still thinking")),
                "",
            ),
            (
                events({"reasoning_content": "still thinking"}, finish="length", usage=DETAILS),
                " (64 reasoning tokens)",
            ),
        ],
        ids=["whole-empty", "whole-null", "whole-null-no-count", "streamed"],
    )
    def test_a_limit_spent_on_reasoning_says_so(self, cli, server, reply, count):
        server.reply(reply)
        done = cli("--base-url", server.url, "--max-tokens", "64", "q")
        assert (done.code, done.out, done.err) == (0, "\n", LIMIT_WARNING.format(count))

    @pytest.mark.parametrize(
        "content, out, err",
        [
            ("<think>hm</think>Answer.", "Answer.\n", "reasoning:\nhm\n\n"),
            (" \n<think>\nhm\n</think>\n\nAnswer.", "Answer.\n", "reasoning:\n\nhm\n\n"),
            ("Answer: <think>hm</think>", "Answer: <think>hm</think>\n", ""),
            ("<thinking>hm</thinking>", "<thinking>hm</thinking>\n", ""),
        ],
        ids=["at the start", "after whitespace", "later is text", "another tag"],
    )
    def test_a_think_block_at_the_start_of_the_content_is_reasoning(
        self, cli, server, content, out, err
    ):
        server.reply(json_response(completion(content)))
        done = cli("--base-url", server.url, "--reasoning", "show", "q")
        assert (done.code, done.out, done.err) == (0, out, err)
        [[turn]] = saved().values()
        assert turn["assistant"] == out[:-1]


class TestAnyField:
    def test_o_goes_last_and_wins_over_the_flags(self, cli, server):
        done = cli(
            "--base-url",
            server.url,
            "-m",
            "flag-model",
            "--temperature",
            "1",
            "--max-tokens",
            "9",
            "--reasoning-effort",
            "high",
            "-o",
            "model",
            "o-model",
            "-o",
            "temperature",
            "0.2",
            "-o",
            "max_tokens",
            "null",
            "-o",
            "reasoning_effort",
            "low",
            "-o",
            "seed",
            "42",
            "-o",
            "stop",
            '["\\n"]',
            "-o",
            "response_format",
            '{"type": "json_object"}',
            "-o",
            "verbosity",
            "low",
            "-o",
            "top_p",
            "NaN",
            "-o",
            "presence_penalty",
            "Infinity",
            "q",
        )
        assert (done.code, done.out, done.err) == (0, "Hello!\n", "")
        assert server.bodies[0] == {
            "model": "o-model",
            "messages": [{"role": "user", "content": "q"}],
            "temperature": 0.2,
            "reasoning_effort": "low",
            "seed": 42,
            "stop": ["\n"],
            "response_format": {"type": "json_object"},
            "verbosity": "low",
            "top_p": "NaN",
            "presence_penalty": "Infinity",
        }

    @pytest.mark.parametrize("key", ["messages", "stream"])
    def test_fields_chat_py_builds_are_refused(self, cli, server, key):
        done = cli("--base-url", server.url, "-o", key, "true", "q")
        assert (done.code, done.out, done.err) == (
            2,
            "",
            f"error: -o {key}: chat.py builds '{key}' itself\n",
        )
        assert server.requests == []

    def test_o_shows_in_the_trace_and_in_curl(self, cli, server):
        done = cli("--base-url", server.url, "-v", "-o", "seed", "7", "q")
        assert done.code == 0 and '>   "seed": 7' in done.err.splitlines()
        done = cli(
            "--base-url", server.url, "--curl", "-o", "seed", "7", "-o", "model", "null", "q"
        )
        assert curl_body(done.out) == {"messages": [{"role": "user", "content": "q"}], "seed": 7}
        assert len(server.requests) == 1

    def test_the_saved_model_is_the_one_sent(self, cli, server):
        assert cli("--base-url", server.url, "-o", "model", "o-model", "q").code == 0
        assert cli("--base-url", server.url, "-c", "again").code == 0
        assert [body["model"] for body in server.bodies] == ["o-model", "o-model"]


class TestUsage:
    def test_a_whole_reply(self, cli, server):
        done = cli("--base-url", server.url, "-u", "q")
        assert (done.code, done.out, done.err) == (0, "Hello!\n", "usage: 5 in, 2 out\n")
        assert "stream_options" not in server.bodies[0]

    def test_a_stream_asks_for_usage_only_with_u(self, cli, server):
        usage = {
            "prompt_tokens": 11,
            "completion_tokens": 3,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 2},
        }
        server.reply(events({"content": "ok"}, usage=usage))
        done = cli("--base-url", server.url, "--stream", "-u", "q")
        assert (done.code, done.out, done.err) == (
            0,
            "ok\n",
            "usage: 11 in, 3 out, 0 cached, 2 reasoning\n",
        )
        assert server.bodies[0]["stream_options"] == {"include_usage": True}
        assert cli("--base-url", server.url, "--stream", "-v", "q").code == 0
        assert "stream_options" not in server.bodies[1]  # -v alone does not change the request

    def test_no_usage_in_the_reply(self, cli, server):
        server.reply(events({"content": "ok"}))
        done = cli("--base-url", server.url, "--stream", "-u", "q")
        assert (done.code, done.out, done.err) == (0, "ok\n", "usage: not reported by the server\n")

    def test_usage_comes_after_the_warnings(self, cli, server):
        server.reply(json_response(completion("cut", finish_reason="length")))
        done = cli("--base-url", server.url, "-u", "q")
        assert (done.code, done.out, done.err) == (
            0,
            "cut\n",
            (
                "warning: the reply was cut off at the token limit (finish_reason: length)\n"
                "usage: 5 in, 2 out\n"
            ),
        )


class TestModels:
    LIST: ClassVar[dict] = {
        "object": "list",
        "data": [
            {"id": "zeta", "object": "model"},
            {"id": "alpha"},
            {"id": "Mid"},
            {"no": "id"},
            {"id": 7},
            "junk",
        ],
    }

    def test_ids_sorted_one_per_line(self, cli, server):
        server.reply(json_response(self.LIST))
        done = cli("--base-url", server.url, "--models")
        assert (done.code, done.out, done.err) == (0, "Mid\nalpha\nzeta\n", "")
        request = server.requests[0]
        assert (request.method, request.path, request.raw) == ("GET", "/v1/models", b"")
        assert request.headers["authorization"] == f"Bearer {FAKE_KEY}"

    def test_a_keyless_local_server(self, cli, server):
        server.reply(json_response(self.LIST))
        assert cli("--base-url", server.url, "--models", key=None).out == "Mid\nalpha\nzeta\n"
        assert "authorization" not in server.requests[0].headers

    def test_openai_without_a_key_is_a_usage_error(self, cli):
        done = cli("--models", key=None)
        assert (done.code, done.out, done.err) == (
            2,
            "",
            missing_key_error(),
        )

    @pytest.mark.parametrize(
        "reply, err",
        [
            (
                json_response({"error": {"message": "bad key"}}, 401),
                "HTTP 401 Unauthorized: bad key",
            ),
            (
                json_response({"detail": "Not Found"}, 404),
                "HTTP 404 Not Found (GET {url}/models: this server lists no models)",
            ),
            (
                json_response({"models": ["x"]}),
                "unexpected reply from the server: no list of models ('data')",
            ),
        ],
        ids=["refused", "no-list-here", "not-a-list"],
    )
    def test_errors_exit_1_saying_what_is_wrong(self, cli, server, reply, err):
        server.reply(reply)
        done = cli("--base-url", server.url, "--models")
        assert (done.code, done.out, done.err) == (1, "", f"error: {err.format(url=server.url)}\n")

    def test_an_empty_list_is_a_warning(self, cli, server):
        server.reply(json_response({"data": []}))
        done = cli("--base-url", server.url, "--models")
        assert (done.code, done.out, done.err) == (0, "", "warning: the server lists no models\n")

    def test_retries_and_trace(self, cli, server):
        server.reply(
            json_response({"error": {"message": "warming up"}}, 503), json_response(self.LIST)
        )
        done = cli("--base-url", server.url, "-v", "--models")
        assert (done.code, done.out) == (0, "Mid\nalpha\nzeta\n")
        assert len(server.requests) == 2 and len(cli.waits) == 1
        lines = done.err.splitlines()
        assert lines.count("> GET /v1/models HTTP/1.1") == 2 and '<       "id": "zeta",' in lines
        assert f"warning: HTTP 503; retrying in {cli.waits[0]:.1f} s (2 of 3)" in lines


class TestFiles:
    def test_files_follow_the_question_and_stdin_in_order(self, cli, server, tmp_path):
        (tmp_path / "a.py").write_text("print('a')\n")
        (tmp_path / "notes.md").write_text("Use ```code``` fences.")
        done = cli(
            "--base-url",
            server.url,
            "-f",
            "a.py",
            "--file",
            "notes.md",
            "Compare",
            stdin="piped text\n",
        )
        assert (done.code, done.out, done.err) == (0, "Hello!\n", "")
        assert server.bodies[0]["messages"] == [
            {
                "role": "user",
                "content": (
                    "Compare\n\npiped text\n\na.py\n```\nprint('a')\n```\n\n"
                    "notes.md\n````\nUse ```code``` fences.\n````"
                ),
            }
        ]

    def test_a_file_alone_is_a_question(self, cli, server, tmp_path):
        (tmp_path / "q.txt").write_text("What is 2+2?")
        server.reply(json_response(completion("4")))
        assert cli("--base-url", server.url, "-f", "q.txt").out == "4\n"
        assert server.bodies[0]["messages"][0]["content"] == "q.txt\n```\nWhat is 2+2?\n```"

    def test_non_utf8_is_replaced_with_a_warning(self, cli, server, tmp_path):
        (tmp_path / "latin.txt").write_bytes("café".encode("latin-1"))
        done = cli("--base-url", server.url, "-f", "latin.txt", "q")
        assert (done.code, done.out, done.err) == (
            0,
            "Hello!\n",
            (
                "warning: latin.txt is not UTF-8 (byte 0xe9 at offset 3); "
                "undecodable bytes were replaced with U+FFFD\n"
            ),
        )
        assert server.bodies[0]["messages"][0]["content"] == "q\n\nlatin.txt\n```\ncaf\ufffd\n```"

    @pytest.mark.parametrize(
        "name, make, err",
        [
            ("missing.txt", None, "cannot read file missing.txt: No such file or directory"),
            ("adir", "dir", "cannot read file adir: Is a directory"),
            (
                "blob.bin",
                b"\x00\x01binary",
                (
                    "cannot add blob.bin: it is not text (it holds NUL bytes) and not one of "
                    "the files chat.py can send: images (PNG, JPEG, GIF, WebP, BMP, TIFF), PDF "
                    "files, audio (WAV, MP3)"
                ),
            ),
            (
                "photo.png",
                b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
                "cannot decode image photo.png: Truncated File Read",  # a PNG, by its first bytes
            ),
            (
                "big.txt",
                16 * 2**20 + 1,
                "big.txt holds more than 16 MiB: chat.py reads no further (send a part of it)",
            ),
        ],
        ids=["missing", "directory", "binary", "picture", "over-16-MiB"],
    )
    def test_bad_files_exit_2_naming_the_file_and_send_nothing(
        self, cli, server, tmp_path, name, make, err
    ):
        if make == "dir":
            (tmp_path / name).mkdir()
        elif isinstance(make, int):
            with open(tmp_path / name, "wb") as file:
                file.truncate(make)  # sparse: cheap to make
        elif make is not None:
            (tmp_path / name).write_bytes(make)
        done = cli("--base-url", server.url, "-f", name, "q")
        assert (done.code, done.out, done.err) == (2, "", f"error: {err}\n")
        assert server.requests == []

    def test_an_endless_file_is_refused_at_once(self, cli, server):
        finished = []
        worker = threading.Thread(
            target=lambda: finished.append(cli("--base-url", server.url, "-f", "/dev/zero", "q")),
            daemon=True,
        )
        started = time.monotonic()
        worker.start()
        worker.join(timeout=20)  # a run reading on would never end: fail, do not hang
        assert finished, "chat.py -f /dev/zero did not end"
        assert time.monotonic() - started < 5
        done = finished[0]
        assert (done.code, done.out, done.err) == (
            2,
            "",
            "error: cannot read file /dev/zero: not a regular file\n",
        )
        assert server.requests == []

    def test_a_nul_after_the_first_8_kib_is_still_text(self, cli, server, tmp_path):
        (tmp_path / "log.txt").write_bytes(b"x" * 9000 + b"\x00tail")
        assert cli("--base-url", server.url, "-f", "log.txt", "q").code == 0
        assert server.bodies[0]["messages"][0]["content"].endswith("x\x00tail\n```")

    def test_an_unreadable_file(self, cli, server, tmp_path):
        # A real process: root reads any file, so it runs without the capabilities that allow it.
        path = tmp_path / "secret.txt"
        path.write_text("hidden")
        path.chmod(0)
        command = [sys.executable, str(CHAT), "--base-url", server.url, "-f", str(path), "q"]
        if os.geteuid() == 0:
            if not shutil.which("setpriv"):
                pytest.skip("running as root without setpriv (util-linux) to drop privileges")
            command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env=cli.environ(FAKE_KEY, None),
            cwd=tmp_path,
            timeout=30,
            check=False,
        )
        assert (done.returncode, done.stdout, done.stderr) == (
            2,
            "",
            f"error: cannot read file {path}: Permission denied\n",
        )
        assert server.requests == []


class TestWire:
    @pytest.mark.parametrize(
        "base_url, field",
        [
            ("https://api.openai.com/v1", "max_completion_tokens"),
            ("https://eu.api.openai.com/v1", "max_completion_tokens"),
            ("https://me.openai.azure.com/openai/v1", "max_completion_tokens"),
            ("https://r.cognitiveservices.azure.com/openai/v1", "max_completion_tokens"),
            ("https://p.services.ai.azure.com/openai/v1", "max_completion_tokens"),
            ("https://api.openai.com.example.net/v1", "max_tokens"),
            ("http://127.0.0.1:8080/v1", "max_tokens"),
        ],
    )
    def test_the_max_tokens_field_by_host(self, cli, base_url, field):
        done = cli("--base-url", base_url, "--curl", "--max-tokens", "7", "q")
        assert (done.code, done.err) == (0, "")
        assert curl_body(done.out) == {
            "model": "gpt-5.4-mini",
            "messages": [{"role": "user", "content": "q"}],
            field: 7,
        }

    def test_a_query_string_stays_after_the_path(self, cli, server):
        server.reply(json_response(completion("ok")), json_response({"data": [{"id": "m"}]}))
        assert cli("--base-url", server.url + "?api-version=2025-04-01-preview", "q").out == "ok\n"
        assert cli("--base-url", server.url + "/?api-version=x", "--models").out == "m\n"
        assert [(request.method, request.path) for request in server.requests] == [
            ("POST", "/v1/chat/completions?api-version=2025-04-01-preview"),
            ("GET", "/v1/models?api-version=x"),
        ]

    def test_blank_data_is_a_keep_alive(self, cli, server):
        def reply(conn, request):
            conn.sendall(
                SSE_HEAD
                + chunk_of(b"data:\ndata:\n\ndata:   \n\n")
                + chunk_of(chunk("ok"))
                + chunk_of(b"data: \t\n\n")
                + chunk_of(chunk(finish_reason="stop"))
                + chunk_of(b"data: [DONE]\n\n")
                + END_CHUNKS
            )

        server.reply(reply)
        done = cli("--base-url", server.url, "--stream", "q")
        assert (done.code, done.out, done.err) == (0, "ok\n", "")

    @pytest.mark.skipif(
        importlib.util.find_spec("socks") is not None, reason="PySocks is installed here"
    )
    @pytest.mark.parametrize("variable", ["ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy"])
    def test_a_socks_proxy_without_pysocks(self, cli, server, monkeypatch, variable):
        monkeypatch.setenv(
            variable, "socks5h://127.0.0.1:9"
        )  # requests reads proxies from os.environ
        https_url = server.url.replace("http://", "https://")  # never leaves this machine
        done = cli("--base-url", https_url, "q")
        assert (done.code, done.out, done.err) == (
            2,
            "",
            (
                "error: a socks5:// proxy is set in the environment (ALL_PROXY, HTTPS_PROXY), "
                "but PySocks is not installed (pip install 'requests[socks]')\n"
            ),
        )
        assert server.requests == []

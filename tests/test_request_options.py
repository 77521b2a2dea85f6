"""Today's models and servers: reasoning, -o for any field, -u for usage, --models, -f files,
and the wire fixes found in the field. Each field is checked on the wire, present only when asked."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CHAT, END_CHUNKS, SSE_HEAD, chunked, completion, json_response

URL = "/v1/chat/completions"


def events(*deltas, finish="stop", usage=None) -> bytes:
    """A stream: one event per delta dict, a finish_reason, an optional usage chunk, [DONE]."""
    chunks = [{"choices": [{"index": 0, "delta": delta}]} for delta in deltas]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    if usage:
        chunks.append({"choices": [], "usage": usage})
    lines = [b"data: " + json.dumps(chunk).encode() + b"\n\n" for chunk in chunks]
    return b"".join(lines) + b"data: [DONE]\n\n"


def streaming(raw_server, body: bytes):
    return raw_server(lambda conn, request: conn.sendall(SSE_HEAD + chunked(body) + END_CHUNKS))


def answering(raw_server, payload):
    return raw_server(lambda conn, request: conn.sendall(json_response(200, payload)))


class TestReasoning:
    THINKING = [{"reasoning_content": "Let me "}, {"reasoning_content": "think."}, {"content": "The "},
                {"content": "answer."}]

    def test_streamed_reasoning_goes_to_stderr_and_stdout_is_the_answer(self, run_chat, raw_server):
        url, _ = streaming(raw_server, events(*self.THINKING))
        done = run_chat("--base-url", url, "--stream", "--reasoning", "show", "q")
        assert (done.code, done.out, done.err) == (0, "The answer.\n", "Let me think.\n\n")

    def test_reasoning_is_hidden_by_default_when_stderr_is_not_a_terminal(self, run_chat, raw_server):
        url, _ = streaming(raw_server, events(*self.THINKING))
        done = run_chat("--base-url", url, "--stream", "q")
        assert (done.code, done.out, done.err) == (0, "The answer.\n", "")

    @pytest.mark.parametrize(
        "message, shown",
        [({"reasoning_content": "deepseek style"}, "deepseek style"),
         ({"reasoning": "vllm style"}, "vllm style"),
         ({"reasoning_content": "wins", "reasoning": "loses"}, "wins"),
         ({"reasoning_content": "", "reasoning": "the other"}, "the other"),
         ({"reasoning_content": {"not": "text"}, "reasoning": ["nor", "this"]}, "")],
    )
    def test_whole_replies_carry_reasoning_in_either_field(self, run_chat, raw_server, message, shown):
        url, _ = answering(raw_server, completion("Answer.", **message))
        done = run_chat("--base-url", url, "--reasoning", "show", "q")
        assert (done.code, done.out, done.err) == (0, "Answer.\n", f"{shown}\n\n" if shown else "")

    def test_the_vllm_field_streams_too(self, run_chat, raw_server):
        url, _ = streaming(raw_server, events({"reasoning": "hmm"}, {"content": "ok"}))
        done = run_chat("--base-url", url, "--stream", "--reasoning", "show", "q")
        assert (done.out, done.err) == ("ok\n", "hmm\n\n")

    def test_reasoning_is_never_saved_nor_sent_back(self, run_chat, raw_server):
        url, received = streaming(raw_server, events(*self.THINKING))
        assert run_chat("--base-url", url, "--stream", "--reasoning", "show", "q1").code == 0
        assert run_chat("--base-url", url, "-c", "--stream", "q2").code == 0
        assert received[1]["body"]["messages"][1] == {"role": "assistant", "content": "The answer."}
        [saved] = Path(os.environ["CHAT_PY_HOME"]).glob("*.jsonl")
        assert "think" not in saved.read_text()

    def test_reasoning_effort_is_sent_only_when_asked(self, run_chat, raw_server):
        url, received = answering(raw_server, completion("ok"))
        assert run_chat("--base-url", url, "--reasoning-effort", "minimal", "q").code == 0
        assert run_chat("--base-url", url, "q").code == 0
        assert received[0]["body"]["reasoning_effort"] == "minimal"
        assert "reasoning_effort" not in received[1]["body"]

    @pytest.mark.parametrize("stream", [[], ["--stream"]])
    def test_a_limit_spent_on_reasoning_says_so(self, run_chat, raw_server, stream):
        usage = {"prompt_tokens": 9, "completion_tokens": 64,
                 "completion_tokens_details": {"reasoning_tokens": 64}}
        if stream:
            url, _ = streaming(raw_server, events({"reasoning_content": "still thinking"}, finish="length",
                                                  usage=usage))
        else:
            url, _ = answering(raw_server, {**completion("", finish_reason="length"), "usage": usage})
        done = run_chat("--base-url", url, *stream, "--max-tokens", "64", "q")
        assert (done.code, done.out) == (0, "\n")
        assert done.err == ("warning: the token limit went to reasoning (64 reasoning tokens) before any "
                            "answer: raise --max-tokens or lower --reasoning-effort\n")

    def test_think_tags_in_the_content_are_left_alone(self, run_chat, raw_server):
        url, _ = answering(raw_server, completion("<think>hm</think>Answer."))
        done = run_chat("--base-url", url, "--reasoning", "show", "q")
        assert (done.out, done.err) == ("<think>hm</think>Answer.\n", "")


class TestAnyField:
    def test_o_goes_last_and_wins_over_the_flags(self, run_chat, raw_server):
        url, received = answering(raw_server, completion("ok"))
        done = run_chat("--base-url", url, "-m", "flag-model", "--temperature", "1", "--max-tokens", "9",
                        "--reasoning-effort", "high", "-o", "model", "o-model", "-o", "temperature", "0.2",
                        "-o", "max_tokens", "null", "-o", "reasoning_effort", "low", "-o", "seed", "42",
                        "-o", "stop", '["\\n"]', "-o", "response_format", '{"type": "json_object"}',
                        "-o", "verbosity", "low", "-o", "top_p", "NaN", "q")
        assert done.code == 0, done.err
        body = received[0]["body"]
        assert body == {"model": "o-model", "messages": [{"role": "user", "content": "q"}],
                        "temperature": 0.2, "reasoning_effort": "low", "seed": 42, "stop": ["\n"],
                        "response_format": {"type": "json_object"}, "verbosity": "low", "top_p": "NaN"}

    @pytest.mark.parametrize("key", ["messages", "stream"])
    def test_fields_chat_py_builds_are_refused(self, run_chat, raw_server, key):
        url, received = answering(raw_server, completion("never"))
        done = run_chat("--base-url", url, "-o", key, "true", "q")
        assert done.code == 2 and f"-o {key}" in done.err and received == []

    def test_o_shows_in_the_trace_and_in_curl(self, run_chat, raw_server):
        url, _ = answering(raw_server, completion("ok"))
        assert '>   "seed": 7\n' in run_chat("--base-url", url, "-v", "-o", "seed", "7", "q").err
        curl = run_chat("--base-url", url, "--curl", "-o", "seed", "7", "-o", "model", "null", "q").out
        assert '"seed": 7' in curl and '"model"' not in curl

    def test_the_saved_model_is_the_one_sent(self, run_chat, raw_server):
        url, received = answering(raw_server, completion("ok"))
        assert run_chat("--base-url", url, "-o", "model", "o-model", "q").code == 0
        assert run_chat("--base-url", url, "-c", "again").code == 0
        assert received[1]["body"]["model"] == "o-model"


class TestUsage:
    def test_usage_of_a_whole_reply(self, run_chat, raw_server):
        url, received = answering(raw_server, completion("ok"))
        done = run_chat("--base-url", url, "-u", "q")
        assert (done.code, done.out, done.err) == (0, "ok\n", "usage: 5 in, 2 out\n")
        assert "stream_options" not in received[0]["body"]

    def test_a_stream_asks_for_usage_only_with_u(self, run_chat, raw_server):
        usage = {"prompt_tokens": 11, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 0},
                 "completion_tokens_details": {"reasoning_tokens": 2}}
        url, received = streaming(raw_server, events({"content": "ok"}, usage=usage))
        done = run_chat("--base-url", url, "--stream", "-u", "q")
        assert (done.code, done.out, done.err) == (0, "ok\n", "usage: 11 in, 3 out, 0 cached, 2 reasoning\n")
        assert received[0]["body"]["stream_options"] == {"include_usage": True}
        assert run_chat("--base-url", url, "--stream", "-v", "q").code == 0
        assert "stream_options" not in received[1]["body"]  # -v alone does not change the request

    def test_no_usage_in_the_reply(self, run_chat, raw_server):
        url, _ = streaming(raw_server, events({"content": "ok"}))
        done = run_chat("--base-url", url, "--stream", "-u", "q")
        assert (done.out, done.err) == ("ok\n", "usage: not reported by the server\n")

    def test_usage_comes_after_the_warnings(self, run_chat, raw_server):
        url, _ = answering(raw_server, completion("cut", finish_reason="length"))
        done = run_chat("--base-url", url, "-u", "q")
        assert done.err.splitlines()[-1] == "usage: 5 in, 2 out" and done.err.startswith("warning: ")


class TestModels:
    LIST = {"object": "list", "data": [{"id": "zeta", "object": "model"}, {"id": "alpha"}, {"id": "Mid"},
                                      {"no": "id"}, "junk"]}

    def test_ids_sorted_one_per_line(self, run_chat, raw_server):
        url, received = answering(raw_server, self.LIST)
        done = run_chat("--base-url", url, "--models")
        assert (done.code, done.out, done.err) == (0, "Mid\nalpha\nzeta\n", "")
        assert received[0]["line"].startswith("GET /v1/models ")
        assert received[0]["headers"]["authorization"].startswith("Bearer sk-test-")

    def test_keyless_local_server(self, run_chat, raw_server):
        url, received = answering(raw_server, self.LIST)
        assert run_chat("--base-url", url, "--models", key=None).code == 0
        assert "authorization" not in received[0]["headers"]

    def test_openai_without_a_key_is_a_usage_error(self, run_chat):
        done = run_chat("--models", key=None)
        assert done.code == 2 and "OPENAI_API_KEY" in done.err

    def test_errors_exit_as_elsewhere(self, run_chat, raw_server):
        refusal = json_response(401, {"error": {"message": "bad key"}})
        url, _ = raw_server(lambda conn, request: conn.sendall(refusal))
        done = run_chat("--base-url", url, "--models")
        assert (done.code, done.err) == (1, "error: HTTP 401 Unauthorized: bad key\n")

    def test_a_server_without_a_model_list(self, run_chat, raw_server):
        url, _ = raw_server(lambda conn, request: conn.sendall(json_response(404, {"detail": "Not Found"})))
        done = run_chat("--base-url", url, "--models")
        assert done.code == 1 and "(this server lists no models at BASE_URL/models)" in done.err

    def test_a_reply_that_is_not_a_list(self, run_chat, raw_server):
        url, _ = answering(raw_server, {"models": ["x"]})
        done = run_chat("--base-url", url, "--models")
        assert done.code == 1 and "no list of models" in done.err

    def test_retries_and_trace(self, run_chat, raw_server):
        answers = [json_response(503, {"error": {"message": "warming up"}}), json_response(200, self.LIST)]
        url, received = raw_server(lambda conn, request: conn.sendall(answers[min(len(received) - 1, 1)]))
        done = run_chat("--base-url", url, "-v", "--models")
        assert done.code == 0 and done.out == "Mid\nalpha\nzeta\n" and len(received) == 2
        assert "> GET /v1/models HTTP/1.1" in done.err and '<       "id": "zeta",' in done.err
        assert "warning: HTTP 503 Service Unavailable: warming up; retrying in" in done.err


class TestFiles:
    def test_files_follow_the_question_and_stdin_in_order(self, run_chat, raw_server, tmp_path):
        (tmp_path / "a.py").write_text("print('a')\n")
        (tmp_path / "notes.md").write_text("Use ```code``` fences.")
        url, received = answering(raw_server, completion("ok"))
        done = run_chat("--base-url", url, "-f", "a.py", "--file", "notes.md", "Compare",
                        stdin="piped text\n")
        assert done.code == 0, done.err
        assert received[0]["body"]["messages"][0]["content"] == (
            "Compare\n\npiped text\n\na.py\n```\nprint('a')\n```\n\n"
            "notes.md\n````\nUse ```code``` fences.\n````")

    def test_a_file_alone_is_a_question(self, run_chat, raw_server, tmp_path):
        (tmp_path / "q.txt").write_text("What is 2+2?")
        url, received = answering(raw_server, completion("4"))
        assert run_chat("--base-url", url, "-f", "q.txt").out == "4\n"
        assert received[0]["body"]["messages"][0]["content"] == "q.txt\n```\nWhat is 2+2?\n```"

    def test_non_utf8_is_replaced_with_a_warning(self, run_chat, raw_server, tmp_path):
        (tmp_path / "latin.txt").write_bytes("café".encode("latin-1"))
        url, received = answering(raw_server, completion("ok"))
        done = run_chat("--base-url", url, "-f", "latin.txt", "q")
        assert done.code == 0
        assert done.err == ("warning: latin.txt is not UTF-8 (byte 0xe9 at offset 3); "
                            "undecodable bytes were replaced with U+FFFD\n")
        assert "caf\ufffd" in received[0]["body"]["messages"][0]["content"]

    @pytest.mark.parametrize(
        "name, make, words",
        [("missing.txt", None, "cannot read file missing.txt: No such file or directory"),
         ("adir", "dir", "cannot read file adir: Is a directory"),
         ("blob.bin", b"\x00\x01binary", "cannot add blob.bin: it is not a text file (it holds NUL bytes)"),
         ("photo.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "(attach pictures with --image)")],
    )
    def test_bad_files_exit_2_naming_the_file_and_send_nothing(self, run_chat, raw_server, tmp_path, name,
                                                               make, words):
        if make == "dir":
            (tmp_path / name).mkdir()
        elif make is not None:
            (tmp_path / name).write_bytes(make)
        url, received = answering(raw_server, completion("never"))
        done = run_chat("--base-url", url, "-f", name, "q")
        assert (done.code, done.out) == (2, "")
        assert done.err.startswith("error: ") and words in done.err and done.err.count("\n") == 1
        assert received == []

    def test_a_nul_after_the_first_8_kib_is_still_text(self, run_chat, raw_server, tmp_path):
        (tmp_path / "log.txt").write_bytes(b"x" * 9000 + b"\x00tail")
        url, received = answering(raw_server, completion("ok"))
        assert run_chat("--base-url", url, "-f", "log.txt", "q").code == 0

    def test_an_unreadable_file(self, tmp_path):
        path = tmp_path / "secret.txt"
        path.write_text("hidden")
        path.chmod(0)
        command = [sys.executable, str(CHAT), "--base-url", "http://127.0.0.1:9/v1", "-f",
                   str(path), "q"]
        if os.geteuid() == 0:
            if not shutil.which("setpriv"):
                pytest.skip("running as root without setpriv (util-linux) to drop privileges")
            command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
        done = subprocess.run(command, capture_output=True, text=True)
        assert (done.returncode, done.stderr) == (2, f"error: cannot read file {path}: Permission denied\n")


class TestWire:
    @pytest.mark.parametrize(
        "base_url, field",
        [("https://r.cognitiveservices.azure.com/openai/v1", "max_completion_tokens"),
         ("https://p.services.ai.azure.com/openai/v1", "max_completion_tokens"),
         ("https://eu.api.openai.com/v1", "max_completion_tokens"),
         ("https://api.openai.com.example.net/v1", "max_tokens")],
    )
    def test_the_max_tokens_field_by_host(self, run_chat, base_url, field):
        done = run_chat("--base-url", base_url, "--curl", "--max-tokens", "7", "q")
        assert f'"{field}": 7' in done.out

    def test_a_query_string_stays_after_the_path(self, run_chat, raw_server):
        url, received = answering(raw_server, completion("ok"))
        assert run_chat("--base-url", url + "?api-version=2025-04-01-preview", "q").code == 0
        assert received[0]["line"] == "POST /v1/chat/completions?api-version=2025-04-01-preview HTTP/1.1"
        assert run_chat("--base-url", url + "/?api-version=x", "--models").code == 1  # not a list, but:
        assert received[1]["line"] == "GET /v1/models?api-version=x HTTP/1.1"

    def test_blank_data_is_a_keep_alive(self, run_chat, raw_server):
        keep_alive = b"data:\ndata:\n\ndata:   \n\n"
        url, _ = streaming(raw_server, keep_alive + events({"content": "ok"}))
        done = run_chat("--base-url", url, "--stream", "q")
        assert (done.code, done.out, done.err) == (0, "ok\n", "")

    @pytest.mark.skipif(importlib.util.find_spec("socks") is not None, reason="PySocks is installed here")
    @pytest.mark.parametrize("variable", ["ALL_PROXY", "HTTPS_PROXY", "https_proxy"])
    def test_a_socks_proxy_without_pysocks(self, run_chat, variable):
        done = run_chat("q", env={variable: "socks5h://127.0.0.1:9"})
        assert (done.code, done.out) == (2, "")
        assert re.fullmatch(r"error: a socks5:// proxy is set .* but PySocks is not installed "
                            r"\(pip install 'requests\[socks\]'\)\n", done.err)

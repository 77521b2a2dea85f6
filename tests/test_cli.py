"""The command line against a fake server: the question, the key, the body, the reply, API
errors and option errors. chat.main() runs in this process with its own surroundings."""

import pytest
from conftest import (
    FAKE_KEY,
    completion,
    http_response,
    json_response,
    missing_key_error,
)

import chat


class TestQuestion:
    def test_words_are_joined(self, cli, server):
        server.reply(json_response(completion("A haiku.")))
        done = cli("--base-url", server.url, "Write", "a", "haiku", "about APIs.")
        assert (done.code, done.out, done.err) == (0, "A haiku.\n", "")
        assert server.bodies[0]["messages"] == [
            {"role": "user", "content": "Write a haiku about APIs."}
        ]

    def test_all_of_stdin_is_read(self, cli, server):
        text = "line one\nline two\n\nline four after a blank\n"
        assert cli("--base-url", server.url, stdin=text).code == 0
        assert server.bodies[0]["messages"][0]["content"] == text.strip()

    def test_question_then_blank_line_then_stdin(self, cli, server):
        assert cli("--base-url", server.url, "Review", "this", stdin="  --- a\n+++ b\n").code == 0
        assert server.bodies[0]["messages"][0]["content"] == "Review this\n\n  --- a\n+++ b"

    @pytest.mark.parametrize(
        "args, stdin", [((), ""), (("   ",), ""), ((), " \n\t\n"), (("",), "")]
    )
    def test_no_question_is_a_usage_error(self, cli, server, args, stdin):
        done = cli("--base-url", server.url, *args, stdin=stdin)
        assert (done.code, done.out) == (2, "")
        assert done.err.startswith("error: no question given") and "python chat.py" in done.err
        assert server.requests == []

    def test_large_stdin_is_sent_intact_with_its_size_in_tokens(self, cli, server):
        text = "".join(f'{n:07d} ünïcödé "quotes" \\ back\tslash\n' for n in range(40_000))
        assert len(text) > 1_000_000
        done = cli("--base-url", server.url, "Summarise", stdin=text)
        assert (done.code, done.out) == (0, "Hello!\n")
        assert server.bodies[0]["messages"][0]["content"] == "Summarise\n\n" + text.strip()
        size = len("Summarise\n\n" + text.strip())
        assert done.err == (
            f"warning: a large question: about {size // 4:,} tokens ({size:,} "
            "characters); a small model's context may not hold it\n"
        )

    def test_a_question_under_a_million_characters_gets_no_note(self, cli, server):
        assert cli("--base-url", server.url, "q", stdin="x" * 999_000).err == ""

    def test_non_utf8_stdin_is_replaced_with_a_warning(self, cli, server):
        done = cli(
            "--base-url", server.url, "Translate", stdin="caf\xe9 cr\xe8me".encode("latin-1")
        )
        assert (done.code, done.out) == (0, "Hello!\n")
        assert done.err == (
            "warning: stdin is not UTF-8 (byte 0xe9 at offset 3); "
            "undecodable bytes were replaced with U+FFFD\n"
        )
        assert server.bodies[0]["messages"][0]["content"] == "Translate\n\ncaf\ufffd cr\ufffdme"

    def test_stdin_over_16_mib_is_refused_unsent(self, cli, server):
        done = cli("--base-url", server.url, "q", stdin=b"x" * (16 * 2**20 + 1))
        assert (done.code, done.out) == (2, "")
        assert done.err == (
            "error: piped stdin holds more than 16 MiB: chat.py reads no further "
            "(send a part of it)\n"
        )
        assert server.requests == []

    def test_stdin_of_exactly_16_mib_is_sent(self, cli, server):
        assert cli("--base-url", server.url, stdin=b"y" * 16 * 2**20).code == 0
        assert len(server.bodies[0]["messages"][0]["content"]) == 16 * 2**20


class TestKey:
    def test_key_is_sent_as_bearer(self, cli, server):
        assert cli("--base-url", server.url, "hi").code == 0
        assert server.requests[0].headers["authorization"] == f"Bearer {FAKE_KEY}"

    def test_key_and_model_from_dotenv_in_the_current_folder(self, cli, server, tmp_path):
        (tmp_path / ".env").write_text(
            "OPENAI_API_KEY=sk-test-from-dotenv-file\nOPENAI_MODEL=dot-model\n"
        )
        assert cli("--base-url", server.url, "hi", key=None).code == 0
        assert server.requests[0].headers["authorization"] == "Bearer sk-test-from-dotenv-file"
        assert server.bodies[0]["model"] == "dot-model"

    def test_environment_wins_over_dotenv(self, cli, server, tmp_path):
        (tmp_path / ".env").write_text(
            "OPENAI_API_KEY=sk-test-from-dotenv-file\nOPENAI_MODEL=dot\n"
        )
        assert cli("--base-url", server.url, "hi", env={"OPENAI_MODEL": "env-model"}).code == 0
        assert server.requests[0].headers["authorization"] == f"Bearer {FAKE_KEY}"
        assert server.bodies[0]["model"] == "env-model"

    def test_missing_key_for_openai_fails_before_any_traffic(
        self, cli, another_server, monkeypatch
    ):
        proxy = another_server()  # anything chat.py sent would go through this "proxy"
        monkeypatch.setenv("HTTPS_PROXY", proxy.url.removesuffix("/v1"))
        done = cli("hi", key=None)
        assert (done.code, done.out) == (2, "")
        assert done.err == missing_key_error()
        assert proxy.requests == []

    def test_missing_key_for_a_local_server_sends_no_authorization(self, cli, server):
        server.reply(json_response(completion("local")))
        done = cli("--base-url", server.url, "hi", key=None)
        assert (done.code, done.out) == (0, "local\n")
        assert "authorization" not in server.requests[0].headers

    def test_base_url_from_environment(self, cli, server):
        done = cli("hi", key=None, env={"OPENAI_BASE_URL": server.url + "/"})
        assert (done.code, done.out) == (0, "Hello!\n")

    @pytest.mark.parametrize(
        "key",
        [
            "sk-test with space",
            "sk-test-\x01-control",
            "sk-test-ключ",
            'sk-test-"quoted"',  # JSON-escaped in the -v trace, where redaction would miss it
            "sk-test-back\\slash",
        ],
    )
    def test_keys_that_cannot_be_a_header_are_refused(self, cli, server, key):
        done = cli("--base-url", server.url, "-v", "hi", key=key)
        assert (done.code, done.err) == (
            2,
            (
                "error: OPENAI_API_KEY holds spaces, quotes, backslashes, control or non-ASCII "
                "characters; check its value\n"
            ),
        )
        assert server.requests == []


class TestBody:
    def test_defaults(self, cli, server):
        assert cli("--base-url", server.url, "q").code == 0
        assert server.bodies[0] == {
            "model": "gpt-5.4-mini",
            "messages": [{"role": "user", "content": "q"}],
        }

    def test_every_option(self, cli, server):
        done = cli(
            "--base-url",
            server.url,
            "-m",
            "my-model",
            "-s",
            "Be terse.",
            "--temperature",
            "0",
            "--max-tokens",
            "42",
            "q",
        )
        assert done.code == 0, done.err
        assert server.bodies[0] == {
            "model": "my-model",
            "messages": [
                {"role": "system", "content": "Be terse."},
                {"role": "user", "content": "q"},
            ],
            "temperature": 0.0,
            "max_tokens": 42,
        }

    def test_request_line_and_headers(self, cli, server):
        assert cli("--base-url", server.url + "//", "q").code == 0
        request = server.requests[0]
        assert (request.method, request.path) == ("POST", "/v1/chat/completions")
        assert request.headers["user-agent"] == f"chat.py/{chat.__version__}"
        assert request.headers["content-type"] == "application/json"


class TestReply:
    def test_refusal_is_shown_instead_of_null_content(self, cli, server):
        server.reply(json_response(completion(None, refusal="I can't help with that.")))
        done = cli("--base-url", server.url, "q")
        assert (done.code, done.out, done.err) == (0, "I can't help with that.\n", "")

    @pytest.mark.parametrize(
        "reason, warning",
        [
            ("length", "the reply was cut off at the token limit (finish_reason: length)"),
            (
                "content_filter",
                "the reply was cut off by the content filter (finish_reason: content_filter)",
            ),
        ],
    )
    def test_cut_replies_warn_on_stderr(self, cli, server, reason, warning):
        server.reply(json_response(completion("partial", finish_reason=reason)))
        done = cli("--base-url", server.url, "q")
        assert (done.code, done.out, done.err) == (0, "partial\n", f"warning: {warning}\n")

    def test_content_as_a_list_of_parts(self, cli, server):
        server.reply(
            json_response(
                completion([{"type": "text", "text": "one "}, {"type": "text", "text": "two"}])
            )
        )
        assert cli("--base-url", server.url, "q").out == "one two\n"

    @pytest.mark.parametrize(
        "reply, out",
        [
            ("ends with a newline\n", "ends with a newline\n"),
            ("two\n\n", "two\n\n"),
            ("", "\n"),
            ("plain", "plain\n"),
        ],
    )
    def test_stdout_is_the_reply_and_exactly_one_final_newline(self, cli, server, reply, out):
        server.reply(json_response(completion(reply)))
        assert cli("--base-url", server.url, "q").out == out

    def test_reply_bytes_in_a_pipe_are_utf8_whatever_the_locales_encoding(self, cli, server):
        # (v4: a pipe gets UTF-8; only a terminal that cannot show a character gets "?", as
        # test_platforms.py shows on a pty)
        server.reply(json_response(completion("naïve café ☕ 日本")))
        done = cli.process("--base-url", server.url, "q", env={"PYTHONIOENCODING": "utf-8"})
        assert done.raw_out == "naïve café ☕ 日本\n".encode()
        done = cli.process("--base-url", server.url, "q", env={"PYTHONIOENCODING": "ascii"})
        assert (done.code, done.raw_out, done.err) == (0, "naïve café ☕ 日本\n".encode(), "")


class TestApiErrors:
    def test_openai_error_message_is_shown(self, cli, server):
        body = {
            "error": {
                "message": "Incorrect API key provided.",
                "type": "invalid_request_error",
                "code": "invalid_api_key",
            }
        }
        server.reply(json_response(body, 401))
        done = cli("--base-url", server.url, "q")
        assert (done.code, done.out, done.err) == (
            1,
            "",
            "error: HTTP 401 Unauthorized: Incorrect API key provided.\n",
        )

    def test_html_error_page_is_reduced_to_one_clean_line(self, cli, server):
        page = (
            "<html><head><title>502 Bad Gateway</title><style>body{color:red}</style></head>"
            "<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center>"
            "</body></html>\n" * 20
        )
        server.reply(http_response(502, page.encode(), "text/html", reason="Bad Gateway"))
        done = cli("--base-url", server.url, "--retries", "0", "q")
        assert (done.code, done.err) == (1, "error: HTTP 502 Bad Gateway\n")

    def test_plain_text_error_body_is_cut_to_one_line(self, cli, server):
        server.reply(http_response(400, b"model 'x' not found " * 50, "text/plain"))
        done = cli("--base-url", server.url, "q")
        assert done.code == 1
        assert done.err.startswith("error: HTTP 400 Bad Request: model 'x' not found")
        assert done.err.endswith("…\n") and len(done.err) == 300 + len("\n")

    def test_a_404_shows_the_url_requested_and_how_to_find_the_model(self, cli, server):
        server.reply(json_response({"error": {"message": "model 'gpt-5.4-mini' not found"}}, 404))
        done = cli("--base-url", server.url, "q")
        assert (done.code, done.err) == (
            1,
            (
                "error: HTTP 404 Not Found: model 'gpt-5.4-mini' not found "
                f"(POST {server.url}/chat/completions: check --base-url, and --model against "
                "what python chat.py --models lists)\n"
            ),
        )

    def test_a_404_from_a_base_url_without_a_path_suggests_v1(self, cli, server):
        server.reply(json_response({"detail": "Not Found"}, 404))
        root = server.url.removesuffix("/v1")
        done = cli("--base-url", root, "q")
        assert (done.code, done.err) == (
            1,
            (
                f"error: HTTP 404 Not Found (POST {root}/chat/completions: "
                f"the base URL has no path; try --base-url {root}/v1)\n"
            ),
        )

    @pytest.mark.parametrize(
        "body, message",
        [
            (b"<html>oops</html>", "the server's reply is not JSON: 'oops'"),
            (
                b'{"id": "x", "object": "chat.completion"}',
                "unexpected reply from the server: no choices",
            ),
            (b'{"choices": []}', "unexpected reply from the server: no choices"),
            (
                b'{"choices": [{"message": {"role": "assistant"}}]}',
                "unexpected reply from the server: the message has no text",
            ),
            (b"[1, 2]", "unexpected reply from the server: not a JSON object"),
            (
                b'{"error": {"message": "backend exploded"}}',
                "the server reported an error: backend exploded",
            ),
            (
                b"[" * 100_000,
                "the server's reply is not JSON: '[[[[",
            ),  # too deep for Python's parser
        ],
    )
    def test_malformed_200_is_an_api_error(self, cli, server, body, message):
        server.reply(json_response(body))
        done = cli("--base-url", server.url, "q")
        assert (done.code, done.out) == (1, "")
        assert done.err.startswith(f"error: {message}") and done.err.count("\n") == 1


class TestOptions:
    @pytest.mark.parametrize(
        "args, message",
        [
            (("--bogus",), "unrecognized arguments: --bogus (see --help)"),
            (
                ("--detail", "huge"),
                (
                    "argument --detail: invalid choice: 'huge' (choose from 'low', "
                    "'high', 'original', 'auto') (see --help)"
                ),
            ),
            (
                ("--max-tokens", "0"),
                "--max-tokens must be a whole number of at least 1, not '0' (see --help)",
            ),
            (
                ("--max-tokens", "1.5"),
                "--max-tokens must be a whole number of at least 1, not '1.5' (see --help)",
            ),
            (
                ("--retries", "-1"),
                "--retries must be a whole number of at least 0, not '-1' (see --help)",
            ),
            (
                ("--timeout", "0"),
                "--timeout must be a number of seconds above 0, not '0' (see --help)",
            ),
            (
                ("--timeout", "inf"),
                "--timeout must be a number of seconds above 0, not 'inf' (see --help)",
            ),
            (("--temperature", "warm"), "--temperature must be a number, not 'warm' (see --help)"),
            (("--temperature", "nan"), "--temperature must be a number, not 'nan' (see --help)"),
            (
                ("--base-url", "ftp://example.com"),
                (
                    "--base-url must be a plain http:// or https:// URL with a valid host and "
                    "port, not 'ftp://example.com'"
                ),
            ),
            (
                ("--base-url", "localhost:8080/v1"),
                (
                    "--base-url must be a plain http:// or https:// URL with a valid host and "
                    "port, not 'localhost:8080/v1'"
                ),
            ),
            (("-m", ""), "-m/--model needs a model name"),
        ],
    )
    def test_bad_options_exit_2_with_one_line_saying_what_is_wanted(self, cli, args, message):
        done = cli(*args, "q")
        assert (done.code, done.out, done.err) == (2, "", f"error: {message}\n")

    def test_version_and_help(self, cli):
        assert cli("--version").out == f"chat.py {chat.__version__}\n"
        done = cli("--help")
        assert done.code == 0
        for option in (
            "--image",
            "--detail",
            "--stream",
            "--model",
            "--system",
            "--temperature",
            "--max-tokens",
            "--base-url",
            "--timeout",
            "--retries",
            "--verbose",
            "--curl",
            "--schema",
            "--chats",
            "--forget",
            "-o KEY VALUE",
            "--reasoning-effort",
        ):
            assert option in done.out

    def test_developers_can_ask_for_the_traceback_with_the_key_redacted(self, cli, server):
        server.reply(json_response({"error": {"message": f"bad key {FAKE_KEY}"}}, 401))
        done = cli("--base-url", server.url, "q", env={"CHAT_PY_TRACEBACK": "1"})
        assert done.code == 1
        assert "Traceback (most recent call last)" in done.err and "ApiError: HTTP 401" in done.err
        assert "bad key [redacted]" in done.err and FAKE_KEY not in done.err

    def test_a_bug_is_exit_70_with_a_line_saying_so(self, cli, server, monkeypatch):
        monkeypatch.setattr(chat, "build_messages", lambda *args: 1 / 0)
        done = cli("--base-url", server.url, "q", raise_bugs=False)
        assert (done.code, done.err) == (
            70,
            (
                "error: unexpected ZeroDivisionError: division by zero "
                "(a bug in chat.py; CHAT_PY_TRACEBACK=1 shows where)\n"
            ),
        )

    def test_an_unparsable_dotenv_line_is_a_warning_naming_it(self, cli, server, tmp_path):
        (tmp_path / ".env").write_text("OPENAI_MODEL=from-dotenv\nthis line is 'broken\nGOOD=1\n")
        done = cli("--base-url", server.url, "q")
        assert (done.code, done.out) == (0, "Hello!\n")
        assert done.err == "warning: .env: could not parse statement starting at line 2 (skipped)\n"
        assert server.bodies[0]["model"] == "from-dotenv"

    @pytest.mark.parametrize("where", ["environment", ".env"])
    def test_an_empty_openai_model_counts_as_not_set(self, cli, server, tmp_path, where):
        if where == ".env":
            (tmp_path / ".env").write_text("OPENAI_MODEL=\n")
        env = {"OPENAI_MODEL": ""} if where == "environment" else {}
        assert cli("--base-url", server.url, "q", env=env).code == 0
        assert server.bodies[0]["model"] == "gpt-5.4-mini"


def test_a_missing_dependency_is_exit_2_naming_the_package_and_both_fixes(cli, server):
    # -I -S: no site-packages, so no requests (nor python-dotenv, nor Pillow)
    done = cli.process("--base-url", server.url, "q", python=sys_python_without_site())
    assert (done.code, done.out) == (2, "")
    assert done.err.startswith("error: the requests package is missing: this Python (")
    assert done.err.endswith(
        "cannot import requests (pip install -r requirements.txt, or run chat.py "
        "with the python of the venv you installed into)\n"
    )
    assert server.requests == []


def sys_python_without_site() -> str:
    """A python command that cannot import site-packages: a wrapper script adding -I -S."""
    import os
    import stat
    import sys
    import tempfile

    path = os.path.join(tempfile.mkdtemp(), "python")
    with open(path, "w") as file:
        file.write(f'#!/bin/sh\nexec {sys.executable} -I -S "$@"\n')
    os.chmod(path, stat.S_IRWXU)
    return path

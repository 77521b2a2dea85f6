"""chat.py run as a subprocess against a real local server: question, key, body, reply, errors."""

import json

import pytest
from werkzeug import Response

import chat
from conftest import FAKE_KEY, completion, json_response

URL = "/v1/chat/completions"


def sent(httpserver, index=0) -> dict:
    return json.loads(httpserver.log[index][0].data)


def sent_headers(httpserver, index=0):
    return httpserver.log[index][0].headers


class TestQuestion:
    def test_words_are_joined(self, run_chat, httpserver, base_url):
        httpserver.expect_request(URL, method="POST").respond_with_json(completion("A haiku."))
        done = run_chat("--base-url", base_url, "Write", "a", "haiku", "about APIs.")
        assert (done.code, done.out, done.err) == (0, "A haiku.\n", "")
        assert sent(httpserver)["messages"] == [
            {"role": "user", "content": "Write a haiku about APIs."}]

    def test_all_of_stdin_is_read(self, run_chat, httpserver, base_url):
        httpserver.expect_request(URL).respond_with_json(completion())
        text = "line one\nline two\n\nline four after a blank\n"
        done = run_chat("--base-url", base_url, stdin=text)
        assert done.code == 0, done.err
        assert sent(httpserver)["messages"][0]["content"] == text.strip()

    def test_question_then_blank_line_then_stdin(self, run_chat, httpserver, base_url):
        httpserver.expect_request(URL).respond_with_json(completion())
        done = run_chat("--base-url", base_url, "Review", "this", stdin="--- a\n+++ b\n")
        assert done.code == 0, done.err
        assert sent(httpserver)["messages"][0]["content"] == "Review this\n\n--- a\n+++ b"

    @pytest.mark.parametrize("args, stdin", [((), ""), (("   ",), ""), ((), " \n\t\n"), (("",), "")])
    def test_no_question_is_a_usage_error(self, run_chat, httpserver, base_url, args, stdin):
        done = run_chat("--base-url", base_url, *args, stdin=stdin)
        assert done.code == 2
        assert done.out == ""
        assert done.err.startswith("error: no question given") and "python chat.py" in done.err
        assert httpserver.log == []

    def test_large_stdin_is_sent_intact(self, run_chat, httpserver, base_url):
        httpserver.expect_request(URL).respond_with_json(completion("ok"))
        text = "".join(f"{n:07d} ünïcödé \"quotes\" \\ back\tslash\n" for n in range(120_000))
        assert len(text.encode()) > 4_000_000
        done = run_chat("--base-url", base_url, "Summarise", stdin=text)
        assert done.code == 0, done.err
        assert sent(httpserver)["messages"][0]["content"] == "Summarise\n\n" + text.strip()

    def test_non_utf8_stdin_is_replaced_with_a_warning(self, run_chat, httpserver, base_url):
        httpserver.expect_request(URL).respond_with_json(completion("ok"))
        done = run_chat("--base-url", base_url, "Translate", stdin="caf\xe9 cr\xe8me".encode("latin-1"))
        assert done.code == 0
        assert done.out == "ok\n"
        assert done.err == ("warning: stdin is not UTF-8 (byte 0xe9 at offset 3); "
                            "undecodable bytes were replaced with U+FFFD\n")
        assert sent(httpserver)["messages"][0]["content"] == "Translate\n\ncaf\ufffd cr\ufffdme"


class TestKey:
    def test_key_is_sent_as_bearer(self, run_chat, httpserver, base_url):
        httpserver.expect_request(URL).respond_with_json(completion())
        assert run_chat("--base-url", base_url, "hi").code == 0
        assert sent_headers(httpserver)["Authorization"] == f"Bearer {FAKE_KEY}"

    def test_key_from_dotenv_in_the_current_directory(self, run_chat, httpserver, base_url, tmp_path):
        (tmp_path / ".env").write_text("OPENAI_API_KEY=sk-test-from-dotenv-file\nOPENAI_MODEL=dot-model\n")
        httpserver.expect_request(URL).respond_with_json(completion())
        assert run_chat("--base-url", base_url, "hi", key=None).code == 0
        assert sent_headers(httpserver)["Authorization"] == "Bearer sk-test-from-dotenv-file"
        assert sent(httpserver)["model"] == "dot-model"

    def test_environment_wins_over_dotenv(self, run_chat, httpserver, base_url, tmp_path):
        (tmp_path / ".env").write_text("OPENAI_API_KEY=sk-test-from-dotenv-file\n")
        httpserver.expect_request(URL).respond_with_json(completion())
        assert run_chat("--base-url", base_url, "hi").code == 0
        assert sent_headers(httpserver)["Authorization"] == f"Bearer {FAKE_KEY}"

    def test_missing_key_for_openai_fails_before_any_traffic(self, run_chat, raw_server):
        # Route anything chat.py might send through a local proxy that records it.
        proxy, received = raw_server(lambda conn, request: None)
        proxy = proxy.removesuffix("/v1")
        done = run_chat("hi", key=None, env={"HTTPS_PROXY": proxy, "HTTP_PROXY": proxy})
        assert done.code == 2
        assert done.out == ""
        assert "OPENAI_API_KEY" in done.err and ".env" in done.err
        assert done.err.startswith("error: ") and done.err.count("\n") == 1
        assert received == []

    def test_missing_key_for_a_local_server_sends_no_authorization(self, run_chat, httpserver, base_url):
        httpserver.expect_request(URL).respond_with_json(completion("local"))
        done = run_chat("--base-url", base_url, "hi", key=None)
        assert (done.code, done.out) == (0, "local\n")
        assert "Authorization" not in sent_headers(httpserver)

    def test_base_url_from_environment(self, run_chat, httpserver, base_url):
        httpserver.expect_request(URL).respond_with_json(completion("env url"))
        done = run_chat("hi", key=None, env={"OPENAI_BASE_URL": base_url + "/"})
        assert (done.code, done.out) == (0, "env url\n")


class TestBody:
    def test_defaults(self, run_chat, httpserver, base_url):
        httpserver.expect_request(URL).respond_with_json(completion())
        assert run_chat("--base-url", base_url, "q").code == 0
        assert sent(httpserver) == {"model": "gpt-5.4-mini", "messages": [{"role": "user", "content": "q"}]}

    def test_every_option(self, run_chat, httpserver, base_url):
        httpserver.expect_request(URL).respond_with_json(completion())
        done = run_chat("--base-url", base_url, "-m", "my-model", "-s", "Be terse.",
                        "--temperature", "0", "--max-tokens", "42", "q")
        assert done.code == 0, done.err
        assert sent(httpserver) == {
            "model": "my-model",
            "messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "q"}],
            "temperature": 0.0,
            "max_tokens": 42,
        }

    def test_model_from_environment(self, run_chat, httpserver, base_url):
        httpserver.expect_request(URL).respond_with_json(completion())
        assert run_chat("--base-url", base_url, "q", env={"OPENAI_MODEL": "env-model"}).code == 0
        assert sent(httpserver)["model"] == "env-model"

    def test_request_headers(self, run_chat, httpserver, base_url):
        httpserver.expect_request(URL).respond_with_json(completion())
        assert run_chat("--base-url", base_url + "//", "q").code == 0
        headers = sent_headers(httpserver)
        assert headers["User-Agent"] == f"chat.py/{chat.__version__}"
        assert headers["Content-Type"] == "application/json"


class TestReply:
    def test_refusal_is_shown_instead_of_null_content(self, run_chat, httpserver, base_url):
        httpserver.expect_request(URL).respond_with_json(
            completion(None, refusal="I can't help with that."))
        done = run_chat("--base-url", base_url, "q")
        assert (done.code, done.out, done.err) == (0, "I can't help with that.\n", "")

    @pytest.mark.parametrize("reason, words", [("length", "token limit"),
                                               ("content_filter", "content filter")])
    def test_cut_replies_warn_on_stderr(self, run_chat, httpserver, base_url, reason, words):
        httpserver.expect_request(URL).respond_with_json(completion("partial", finish_reason=reason))
        done = run_chat("--base-url", base_url, "q")
        assert (done.code, done.out) == (0, "partial\n")
        assert done.err.startswith("warning: ") and words in done.err and done.err.count("\n") == 1

    def test_content_as_a_list_of_parts(self, run_chat, httpserver, base_url):
        httpserver.expect_request(URL).respond_with_json(
            completion([{"type": "text", "text": "one "}, {"type": "text", "text": "two"}]))
        done = run_chat("--base-url", base_url, "q")
        assert (done.code, done.out) == (0, "one two\n")

    def test_reply_bytes_are_utf8(self, run_chat, httpserver, base_url):
        httpserver.expect_request(URL).respond_with_json(completion("naïve café ☕ 日本"))
        done = run_chat("--base-url", base_url, "q", env={"PYTHONIOENCODING": "utf-8"})
        assert done.raw_out == "naïve café ☕ 日本\n".encode()

    @pytest.mark.parametrize("env", [{"PYTHONIOENCODING": "ascii"}, {"LANG": "C", "LC_ALL": "C"}])
    def test_stdout_that_cannot_encode_does_not_crash(self, run_chat, httpserver, base_url, env):
        httpserver.expect_request(URL).respond_with_json(completion("naïve ☕ ok"))
        done = run_chat("--base-url", base_url, "q", env=env)
        assert done.code == 0
        assert done.err == ""
        assert done.raw_out.endswith(b" ok\n") and done.raw_out.startswith(b"na")


class TestApiErrors:
    def test_openai_error_message_is_shown(self, run_chat, httpserver, base_url):
        body = {"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                          "code": "invalid_api_key"}}
        httpserver.expect_request(URL).respond_with_json(body, status=401)
        done = run_chat("--base-url", base_url, "q")
        assert done.code == 1
        assert done.out == ""
        assert done.err == "error: HTTP 401 UNAUTHORIZED: Incorrect API key provided.\n"

    def test_html_error_page_is_reduced_to_one_clean_line(self, run_chat, httpserver, base_url):
        page = ("<html><head><title>502 Bad Gateway</title><style>body{color:red}</style></head>"
                "<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center>"
                "</body></html>\n" * 20)
        httpserver.expect_request(URL).respond_with_response(
            Response(page, status=502, content_type="text/html"))
        done = run_chat("--base-url", base_url, "--retries", "0", "q")
        assert done.code == 1
        assert done.err == "error: HTTP 502 BAD GATEWAY\n"

    def test_plain_text_error_body_is_cut_short(self, run_chat, httpserver, base_url):
        httpserver.expect_request(URL).respond_with_data("model 'x' not found " * 50, status=400)
        done = run_chat("--base-url", base_url, "q")
        assert done.code == 1
        assert done.err.startswith("error: HTTP 400 BAD REQUEST: model 'x' not found")
        assert done.err.endswith("…\n") and len(done.err) == 300 + len("\n")

    def test_404_hints_at_the_base_url(self, run_chat, httpserver, base_url):
        httpserver.expect_request(URL).respond_with_json({"detail": "no route for this path"}, status=404)
        done = run_chat("--base-url", base_url, "q")
        assert done.code == 1
        assert "no route for this path" in done.err and "--base-url" in done.err

    @pytest.mark.parametrize(
        "body, words",
        [
            (b"<html>oops</html>", "not JSON"),
            (b'{"id": "x", "object": "chat.completion"}', "no choices"),
            (b'{"choices": []}', "no choices"),
            (b'{"choices": [{"message": {"role": "assistant"}}]}', "no text"),
            (b'[1, 2]', "not a JSON object"),
            (b'{"error": {"message": "backend exploded"}}', "backend exploded"),
        ],
    )
    def test_malformed_200_is_an_api_error(self, run_chat, raw_server, body, words):
        url, _ = raw_server(lambda conn, request: conn.sendall(json_response(200, body)))
        done = run_chat("--base-url", url, "q")
        assert done.code == 1
        assert done.out == ""
        assert done.err.startswith("error: ") and words in done.err and done.err.count("\n") == 1


class TestUsage:
    @pytest.mark.parametrize(
        "args, words",
        [
            (("--bogus", "q"), "unrecognized arguments"),
            (("--timeout", "0", "q"), "--timeout"),
            (("--retries", "-1", "q"), "--retries"),
            (("--max-tokens", "many", "q"), "--max-tokens"),
            (("--detail", "huge", "q"), "--detail"),
            (("--base-url", "ftp://example.com", "q"), "--base-url"),
            (("--base-url", "localhost:8080/v1", "q"), "--base-url"),
        ],
    )
    def test_bad_options_exit_2_with_one_line(self, run_chat, args, words):
        done = run_chat(*args)
        assert done.code == 2
        assert done.out == ""
        assert done.err.startswith("error: ") and words in done.err and done.err.count("\n") == 1

    def test_developers_can_ask_for_the_traceback(self, run_chat):
        done = run_chat("--base-url", "http://127.0.0.1:9/v1", "--retries", "0", "q",
                        env={"CHAT_PY_TRACEBACK": "1"})
        assert done.code == 1  # Python's own exit for an uncaught exception
        assert "Traceback (most recent call last)" in done.err and "ConnectionError" in done.err

    def test_version(self, run_chat):
        done = run_chat("--version")
        assert (done.code, done.out) == (0, f"chat.py {chat.__version__}\n")

    def test_help_lists_every_option(self, run_chat):
        done = run_chat("--help")
        assert done.code == 0
        for option in ("--image", "--detail", "--stream", "--model", "--system", "--temperature",
                       "--max-tokens", "--base-url", "--timeout", "--retries", "--verbose", "--curl"):
            assert option in done.out


class TestSmallThings:
    @pytest.mark.parametrize(
        "args, message",
        [
            (("--max-tokens", "0"), "--max-tokens must be a whole number of at least 1, not '0'"),
            (("--max-tokens", "1.5"), "--max-tokens must be a whole number of at least 1, not '1.5'"),
            (("--retries", "-1"), "--retries must be a whole number of at least 0, not '-1'"),
            (("--timeout", "0"), "--timeout must be a number of seconds above 0, not '0'"),
            (("--timeout", "inf"), "--timeout must be a number of seconds above 0, not 'inf'"),
            (("--temperature", "warm"), "--temperature must be a number, not 'warm'"),
            (("--temperature", "nan"), "--temperature must be a number, not 'nan'"),
        ],
    )
    def test_option_errors_say_what_is_wanted(self, run_chat, args, message):
        done = run_chat(*args, "q")
        assert (done.code, done.out, done.err) == (2, "", f"error: {message} (see --help)\n")

    def test_an_unparsable_dotenv_line_is_a_warning_naming_it(self, run_chat, httpserver, base_url, tmp_path):
        (tmp_path / ".env").write_text("OPENAI_MODEL=from-dotenv\nthis line is 'broken\nGOOD=1\n")
        httpserver.expect_request(URL).respond_with_json(completion("ok"))
        done = run_chat("--base-url", base_url, "q")
        assert (done.code, done.out) == (0, "ok\n")
        assert done.err == "warning: .env: could not parse statement starting at line 2 (skipped)\n"
        assert sent(httpserver)["model"] == "from-dotenv"

    def test_an_empty_model_option_is_a_usage_error(self, run_chat, httpserver, base_url):
        done = run_chat("--base-url", base_url, "-m", "", "q")
        assert (done.code, done.err) == (2, "error: -m/--model needs a model name\n")
        assert httpserver.log == []

    @pytest.mark.parametrize("where", ["environment", ".env"])
    def test_an_empty_openai_model_counts_as_not_set(self, run_chat, httpserver, base_url, tmp_path, where):
        httpserver.expect_request(URL).respond_with_json(completion())
        env = {"OPENAI_MODEL": ""} if where == "environment" else {}
        if where == ".env":
            (tmp_path / ".env").write_text("OPENAI_MODEL=\n")
        assert run_chat("--base-url", base_url, "q", env=env).code == 0
        assert sent(httpserver)["model"] == "gpt-5.4-mini"

    def test_no_key_for_openai_points_to_local_servers_too(self, run_chat):
        done = run_chat("q", key=None)
        assert done.code == 2 and "OPENAI_API_KEY" in done.err and "--base-url" in done.err

    @pytest.mark.parametrize("reply, out", [("ends with a newline\n", "ends with a newline\n"),
                                            ("two\n\n", "two\n\n"), ("", "\n"), ("plain", "plain\n")])
    def test_stdout_is_the_reply_and_exactly_one_final_newline(self, run_chat, httpserver, base_url, reply,
                                                                out):
        httpserver.expect_request(URL).respond_with_json(completion(reply))
        done = run_chat("--base-url", base_url, "q")
        assert (done.code, done.out) == (0, out)

    def test_the_404_hint_says_how_to_find_the_model_name(self, run_chat, httpserver, base_url):
        body = {"error": {"message": "model 'gpt-5.4-mini' not found"}}
        httpserver.expect_request(URL).respond_with_json(body, status=404)
        done = run_chat("--base-url", base_url, "q")
        assert done.code == 1
        assert done.err == ("error: HTTP 404 NOT FOUND: model 'gpt-5.4-mini' not found (requests go to "
                            "BASE_URL/chat/completions: check --base-url, and --model against what "
                            "python chat.py --models lists)\n")

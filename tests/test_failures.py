"""Every failure told right (v4): each one a fake server (or an argument, or a saved file) does
for real, with the user's words on one line, its exit code, and never exit 70 for input."""

import gzip
import io
import json
import os
import socket
import threading
import time

import pytest
from conftest import (
    END_CHUNKS,
    SSE_HEAD,
    chunk,
    chunk_of,
    completion,
    http_response,
    json_response,
    saved,
    sse_response,
)

import chat

OK = json_response(completion("recovered"))
HINT = "(to send text that starts so, write it as a JSON string: '\"...\"')"


def host(server) -> str:
    return f"127.0.0.1:{server.port}"


def save_conversation(name: str, *lines: str) -> None:
    """A saved conversation file of the lines given, written as they are."""
    folder = os.environ["CHAT_PY_HOME"]
    os.makedirs(folder, mode=0o700, exist_ok=True)
    path = os.path.join(folder, f"{name}.jsonl")
    with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as file:
        file.write("".join(line + "\n" for line in lines))


def turn(answer="an answer", **fields) -> str:
    return json.dumps(
        {
            "time": "2026-01-01T10:00:00Z",
            "model": "test-model",
            "user": {"role": "user", "content": "a question"},
            "assistant": answer,
            **fields,
        }
    )


@pytest.fixture
def raw_listener():
    """A TCP listener whose every connection goes to handle(conn): for what is not HTTP at all."""
    listeners, stop = [], threading.Event()

    def start(handle) -> int:
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)

        def serve():
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                with conn:
                    try:
                        handle(conn, stop)
                    except OSError:
                        pass

        threading.Thread(target=serve, daemon=True).start()
        return listener.getsockname()[1]

    yield start
    stop.set()
    for listener in listeners:
        listener.close()


class TestBrokenConnections:
    @pytest.mark.parametrize(
        "sent",
        [
            SSE_HEAD + chunk_of(chunk("so far")),  # killed between chunks: no size line
            SSE_HEAD + chunk_of(chunk("so far")) + b"4",  # killed inside a size line
            SSE_HEAD + chunk_of(chunk("so far")) + b"zz\r\n",  # a size that is no number
        ],
        ids=["between chunks", "mid size line", "bad size"],
    )
    def test_a_server_killed_mid_chunk_is_a_broken_connection_in_words(self, cli, server, sent):
        def killed(conn, request):
            conn.sendall(sent)
            conn.shutdown(socket.SHUT_WR)

        server.reply(killed)
        done = cli("--base-url", server.url, "--stream", "q")
        assert (done.code, done.out) == (3, "so far\n")
        assert done.err == f"error: the connection to {host(server)} broke off mid-reply\n"
        assert saved() == {}

    def test_a_status_line_that_is_no_number(self, cli, server):
        server.reply(b"HTTP/1.1 abc OK\r\n\r\n")
        done = cli("--base-url", server.url, "q")
        assert (done.code, done.out) == (1, "")
        assert (
            done.err == f"error: {host(server)} did not answer in HTTP: 'HTTP/1.1 abc OK\\r\\n'\n"
        )
        assert len(server.requests) == 1

    def test_a_server_that_closes_without_answering_is_retried(self, cli, server):
        server.reply(b"", OK)
        done = cli("--base-url", server.url, "q")
        assert (done.code, done.out) == (0, "recovered\n")
        assert done.err == (
            f"warning: {host(server)} closed the connection without answering; retrying in "
            f"{cli.waits[0]:.1f} s (2 of 3)\n"
        )

    @pytest.mark.parametrize(
        "location, shown",
        [
            ("http://127.0.0.1:abc/", None),
            ("http://[::1", None),
            ("http://127.0.0.1:99999/v1", None),
            # The header's bytes as Latin-1 (as http.client reads them), shown made visible.
            # requests reads them as UTF-8, where NFKC turns a fullwidth / into a / and
            # urlsplit refuses the netloc; read as Latin-1 the same origin was followed (exit 70).
            (
                "http://u\u00ef\u00bc\u008f@127.0.0.1:{port}/v1",
                "http://u\u00ef\u00bc\\x8f@127.0.0.1:{port}/v1",
            ),
            (
                "http://u\u00ef\u00bc\u0083@127.0.0.1:{port}/v1",
                "http://u\u00ef\u00bc\\x83@127.0.0.1:{port}/v1",
            ),
            (
                "http://\u00ef\u00bc\u00a0127.0.0.1:{port}/v1",
                "http://\u00ef\u00bc 127.0.0.1:{port}/v1",
            ),
            ("http://\u00ff@127.0.0.1:{port}/v1", None),  # not UTF-8
        ],
        ids=["port", "bracket", "port range", "fullwidth /", "fullwidth #", "fullwidth @", "\\xff"],
    )
    def test_a_redirect_to_an_address_that_is_not_a_url(self, cli, server, location, shown):
        location = location.format(port=server.port)
        server.reply(http_response(302, b"", "text/plain", f"Location: {location}\r\n"))
        done = cli("--base-url", server.url, "q")
        assert (done.code, done.out) == (1, "")
        assert done.err == (
            "error: the server redirected the request to an address that is not a URL: "
            f"{(shown or location).format(port=server.port)}\n"
        )
        assert len(server.requests) == 1

    @pytest.mark.parametrize("encoding", ["gzip", "deflate"])
    def test_a_same_origin_redirect_with_a_damaged_compressed_body_is_followed(
        self, cli, server, encoding
    ):
        body = gzip.compress(b"moved " * 100)[:20]  # shorter than its Content-Length says
        redirect = (
            f"HTTP/1.1 302 Found\r\nLocation: {server.url}/chat/completions\r\n"
            f"Content-Encoding: {encoding}\r\nContent-Length: 500\r\nConnection: close\r\n\r\n"
        ).encode() + body

        def cut_short(conn, request):
            conn.sendall(redirect)
            conn.shutdown(socket.SHUT_WR)

        server.reply(cut_short, OK)
        done = cli("--base-url", server.url, "q")
        assert (done.code, done.out, done.err) == (0, "recovered\n", "")
        assert len(server.requests) == 2


class TestTLSToPlainHTTP:
    """https:// to a server that speaks plain HTTP (llama-server, Ollama): said at once."""

    def expected(self, port: int, waited: str = "") -> str:
        return (
            f"error: 127.0.0.1:{port} did not answer in TLS{waited}: is it a plain-HTTP server? "
            f"try http://127.0.0.1:{port}/v1\n"
        )

    def test_a_server_silent_after_the_client_hello(self, cli, raw_listener, monkeypatch):
        def silent(conn, stop):
            conn.recv(65536)  # the ClientHello, never answered
            stop.wait(10)

        monkeypatch.setattr(chat, "CONNECT_TIMEOUT", 0.3)
        port = raw_listener(silent)
        done = cli("--base-url", f"https://127.0.0.1:{port}/v1", "--retries", "2", "q")
        assert (done.code, done.out, done.err) == (3, "", self.expected(port, " within 0.3 s"))
        assert cli.waits == []

    @pytest.mark.parametrize(
        "answer",
        [
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            b"",  # closes at once
        ],
        ids=["answers in HTTP", "closes"],
    )
    def test_a_server_that_answers_the_client_hello_in_plain_http(self, cli, raw_listener, answer):
        def plain(conn, stop):
            conn.recv(65536)
            conn.sendall(answer)

        port = raw_listener(plain)
        done = cli("--base-url", f"https://127.0.0.1:{port}/v1", "--retries", "2", "q")
        assert (done.code, done.out, done.err) == (3, "", self.expected(port))
        assert cli.waits == []

    def test_the_fake_server_itself_over_https(self, cli, server, monkeypatch):
        monkeypatch.setattr(chat, "CONNECT_TIMEOUT", 0.3)
        done = cli("--base-url", server.url.replace("http:", "https:"), "q")
        assert (done.code, done.out) == (3, "")
        assert done.err == self.expected(server.port, " within 0.3 s")


def server_error(message: str, kind="server_error", status=500) -> bytes:
    return json_response({"error": {"code": status, "message": message, "type": kind}}, status)


class TestNoRetryWhereAnotherTryCannotHelp:
    @pytest.mark.parametrize(
        "reply, message",
        [
            (server_error("image input is not supported"), "image input is not supported"),
            (
                server_error("tools param requires --jinja flag"),
                "tools param requires --jinja flag",
            ),
            (  # LiteLLM's own 500 around llama.cpp's words
                json_response(
                    {
                        "error": {
                            "message": "litellm.APIConnectionError: OpenAIException - "
                            "image input is not supported",
                            "type": None,
                            "param": None,
                            "code": "500",
                        }
                    },
                    500,
                ),
                "litellm.APIConnectionError: OpenAIException - image input is not supported",
            ),
            (
                server_error("bad field", "invalid_request_error", 503),
                "bad field",
            ),
            (server_error("no audio here", "not_supported_error"), "no audio here"),
        ],
        ids=["llama.cpp image", "llama.cpp --jinja", "LiteLLM", "invalid_request_error", "type"],
    )
    def test_a_5xx_that_says_the_request_cannot_work_is_sent_once(
        self, cli, server, reply, message
    ):
        server.reply(reply, OK)
        done = cli("--base-url", server.url, "q")
        status = "503 Service Unavailable" if b"503" in reply[:12] else "500 Internal Server Error"
        assert (done.code, done.out) == (1, "")
        assert done.err.startswith(f"error: HTTP {status}: {message}")
        assert len(server.requests) == 1 and cli.waits == []

    def test_a_5xx_that_only_says_try_later_is_still_retried(self, cli, server):
        server.reply(server_error("the model is loading"), OK)
        done = cli("--base-url", server.url, "q")
        assert (done.code, done.out, len(server.requests)) == (0, "recovered\n", 2)


class TestContextOverflow:
    @pytest.mark.parametrize(
        "reply",
        [
            json_response(
                {"error": {"code": 400, "message": "Context size has been exceeded."}}, 400
            ),
            json_response(
                {
                    "error": {
                        "message": "The total length of all messages is too long.",
                        "type": "invalid_request_error",
                    }
                },
                400,
            ),
        ],
        ids=["older llama-server", "Perplexity"],
    )
    def test_every_wording_gets_the_hint(self, cli, server, reply):
        server.reply(reply)
        done = cli("--base-url", server.url, "q")
        assert done.code == 1
        assert done.err.endswith(
            " (the question alone fills the model's context: shorten the question)\n"
        )

    def test_an_overflow_inside_a_stream(self, cli, server):
        sglang = (
            b'data: {"object": "error", "message": "Input length (9000 tokens) exceeds the maximum '
            b'allowed length (8192 tokens) for this model\'s context length", "type": '
            b'"BadRequestError", "param": null, "code": 400}\n\n'
        )
        server.reply(sse_response(sglang.replace(b'"object"', b'"error": {"x": 1}, "object"')))
        done = cli("--base-url", server.url, "--stream", "q")
        assert (done.code, done.out) == (1, "")
        assert done.err.endswith(
            " (the question alone fills the model's context: shorten the question)\n"
        )

    def test_max_tokens_is_suggested_when_the_request_set_it(self, cli, server):
        server.reply(json_response({"error": {"message": "context length exceeded"}}, 400))
        done = cli("--base-url", server.url, "--max-tokens", "9000", "q")
        assert done.err == (
            "error: HTTP 400 Bad Request: context length exceeded (the question alone fills the "
            "model's context: shorten the question, or set a smaller --max-tokens)\n"
        )

    def test_in_conversation_mode_the_way_out_is_fewer_turns(self, cli, server):
        server.reply(
            json_response(completion("first")),
            json_response({"error": {"message": "Context size has been exceeded."}}, 400),
        )
        done = cli("--base-url", server.url, ttys=(True, False, False), lines=["one", "two"])
        assert done.code == 0
        assert (
            "error: HTTP 400 Bad Request: Context size has been exceeded. (this conversation's "
            "1 turn and the question fill the model's context: /undo drops the last turn, "
            "/reset starts a new conversation)\n"
        ) in done.err


class TestHeldTraceLines:
    def test_trace_lines_never_land_inside_a_reply_line_on_a_terminal(self, server):
        def one_read_each(conn, request):
            conn.sendall(SSE_HEAD)
            for text in ("one ", "line\nand ", "another"):
                conn.sendall(chunk_of(chunk(text)))
                time.sleep(0.05)  # each delta in its own network read
            conn.sendall(chunk_of(chunk(finish_reason="stop") + b"data: [DONE]\n\n") + END_CHUNKS)

        server.reply(one_read_each)
        screen = io.StringIO()  # stdout and stderr are the same terminal
        env = chat.Env(
            io.BytesIO(b""),
            screen,
            screen,
            {"OPENAI_API_KEY": "sk-test-not-a-real-key", "CHAT_PY_NO_SAVE": "1"},
            ".",
            (False, True, True),
            raise_bugs=True,
        )
        env.styled = False
        assert chat.main(["--base-url", server.url, "-v", "--stream", "q"], env) == 0
        lines = screen.getvalue().splitlines()
        reply = lines.index("one line")  # each reply line whole: the trace lines waited
        assert lines[reply + 1] == "and another"
        assert [line[:8] for line in lines[reply + 2 :]] == ["| data: ", "| "] * 3 + [
            "| data: ",
            "| ",
            "* total ",
        ]


class TestNeverABugForInput:
    """Each input that once ended as exit 70 ("a bug in chat.py")."""

    @pytest.mark.parametrize("args", [[], ["--stream"]], ids=["whole", "streamed"])
    def test_a_lone_surrogate_in_a_reply_is_printed_and_saved(self, cli, server, args):
        escaped = b'"\\ud800 and \\udfff"'
        if args:
            server.reply(
                sse_response(
                    b'data: {"choices": [{"delta": {"content": ' + escaped + b"}}]}\n\n",
                    chunk(finish_reason="stop"),
                    b"data: [DONE]\n\n",
                )
            )
        else:
            server.reply(
                json_response(json.dumps(completion("X")).replace('"X"', escaped.decode()).encode())
            )
        done = cli("--base-url", server.url, *args, "q")
        assert (done.code, done.out) == (0, "\ud800 and \udfff\n")
        [turns] = saved().values()
        assert turns[0]["assistant"] == "\ud800 and \udfff"

    def test_a_non_utf8_byte_in_the_question_and_the_system_prompt(self, cli, server):
        question, system = os.fsdecode(b"caf\xe9"), os.fsdecode(b"be \xff brief")
        done = cli("--base-url", server.url, "-s", system, question)
        assert (done.code, done.out) == (0, "Hello!\n")
        assert server.bodies[0]["messages"] == [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
        ]
        [turns] = saved().values()
        assert (turns[0]["user"]["content"], turns[0]["system"]) == (question, system)

    @pytest.mark.parametrize("option", ["-f", "--image", "--schema"])
    @pytest.mark.parametrize("name", ["\ud800", "a\x00b"], ids=["lone surrogate", "NUL"])
    def test_a_file_name_no_file_can_have(self, cli, server, option, name):
        done = cli(
            "--base-url", server.url, option, ("@" if option == "--schema" else "") + name, "q"
        )
        assert (done.code, done.out) == (2, "")
        assert done.err == f"error: no file can be named {name!r}\n"
        assert server.requests == []

    def test_a_saved_model_with_a_lone_surrogate(self, cli, server):
        save_conversation("odd", turn(model="m\ud800"))  # written as JSON's escape
        done = cli("--base-url", server.url, "-c", "q")
        assert (done.code, done.out) == (0, "Hello!\n")
        assert server.bodies[0]["model"] == "m\ud800"
        assert [each["model"] for each in saved()["odd"]] == ["m\ud800", "m\ud800"]

    @pytest.mark.parametrize(
        "args, message",
        [
            (["--schema", "[" * 100_000], "--schema is not valid JSON: it is nested too deeply"),
            (
                ["-o", "tools", "[" * 100_000],
                "-o tools is not valid JSON: it is nested too deeply " + HINT,
            ),
        ],
        ids=["--schema", "-o"],
    )
    def test_json_nested_past_the_recursion_limit(self, cli, server, args, message):
        done = cli("--base-url", server.url, *args, "q")
        assert (done.code, done.out, done.err) == (2, "", f"error: {message}\n")
        assert server.requests == []

    @pytest.mark.parametrize("depth", range(880, 1000, 6))
    @pytest.mark.parametrize("args", [[], ["--curl"], ["-v"]], ids=["sent", "--curl", "-v"])
    def test_json_deep_enough_to_parse(self, cli, server, depth, args):
        done = cli("--base-url", server.url, "-o", "tools", "[" * depth + "]" * depth, *args, "q")
        if done.code == 2:
            assert done.err in (
                "error: the request nests deeper than 200 levels (from -o or a saved turn)\n",
                "error: -o tools is not valid JSON: it is nested too deeply " + HINT + "\n",
            )
        else:
            assert done.code == 0

    @pytest.mark.parametrize(
        "status, stream", [(400, False), (200, False), (200, True)], ids=["400", "200", "stream"]
    )
    def test_an_error_object_nested_3000_deep(self, cli, server, status, stream):
        # Python 3.12+ parses it (json's C parser has its own stack limit); 3.10 and 3.11 do not
        deep = ('{"error": ' * 3000 + '"deep"' + "}" * 3000).encode()
        server.reply(
            sse_response(b"data: " + deep + b"\n\n") if stream else json_response(deep, status)
        )
        done = cli("--base-url", server.url, *(["--stream"] if stream else []), "q")
        assert (done.code, done.out) == (1, "")
        assert done.err.startswith("error: ") and done.err.count("\n") == 1 and len(done.err) <= 301

    def test_required_names_that_are_not_strings(self, cli, server):
        server.reply(json_response(completion('{"a": 1}')))
        done = cli("--base-url", server.url, "--schema", '{"required": [["a"]]}', "q")
        assert (done.code, done.out, done.err) == (0, '{"a": 1}\n', "")

    def test_a_timeout_too_large_for_a_socket(self, cli, server):
        done = cli("--base-url", server.url, "--timeout", "9.3e9", "q")
        assert (done.code, done.out, done.err) == (0, "Hello!\n", "")

    def test_show_of_a_turn_dated_year_one(self, cli, monkeypatch):
        save_conversation("old", turn(time="0001-01-01T00:00:00Z"))
        monkeypatch.setenv("TZ", "EST+5")  # year 1 in UTC is year 0 here
        time.tzset()
        try:
            done = cli("--show", "old")
        finally:
            monkeypatch.delenv("TZ")
            time.tzset()
        assert (done.code, done.err) == (0, "")
        assert "you, 0001-01-01T00:00:00Z:\n" in done.out

    @pytest.mark.parametrize(
        "args",
        [
            ["-o", "temperature", "1e400"],
            ["-o", "temperature", "[-1e400]"],
            ["-o", "tools", "[1e400]"],
            ["-o", "temperature", "1e400", "--curl"],
        ],
    )
    def test_a_number_json_cannot_hold_is_bad_input(self, cli, server, args):
        done = cli("--base-url", server.url, *args, "q")
        assert (done.code, done.out) == (2, "")
        assert done.err == (
            "error: the request holds NaN or Infinity (from -o or a saved turn), which JSON cannot "
            "carry\n"
        )
        assert server.requests == []

    def test_a_saved_nan_is_bad_input(self, cli, server):
        save_conversation(
            "nan", turn(user={"role": "user", "content": "q", "weight": float("nan")})
        )
        done = cli("--base-url", server.url, "-c", "--curl", "q")
        assert (done.code, done.out) == (2, "")  # --curl printed nothing
        assert done.err.startswith("error: the request holds NaN or Infinity")

    def test_retry_after_1e308_is_one_short_line(self, cli, server):
        server.reply(
            json_response(
                {"error": {"message": "slow down"}}, 429, headers="Retry-After: 1e308\r\n"
            )
        )
        done = cli("--base-url", server.url, "q")
        assert done.code == 1
        assert done.err.startswith(
            "error: HTTP 429 Too Many Requests: slow down (the server asks to wait 1e+308 s"
        )
        assert len(done.err) <= 301 and len(server.requests) == 1

"""Retries, network faults, timeouts, interrupts, a closed stdout and the key: each failure ends
with one line and its exit code. chat.main() runs in this process (its retry waits are recorded
in cli.waits, not slept); real processes only for signals, real pipes and exit codes end to end."""

import contextlib
import json
import os
import platform
import re
import signal
import socket
import struct
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
    http_response,
    json_response,
    nap,
    saved,
    sse_response,
    stream_events,
)
from PIL import Image

import chat

OK = json_response(completion("recovered"))


def error(
    status: int, message: str = "try later", headers: str = "", reason: str | None = None, **fields
) -> bytes:
    """An OpenAI-shaped error response."""
    body = {"error": {"message": message, "type": "server_error", "code": None, **fields}}
    return json_response(body, status, headers=headers, reason=reason)


def reset(conn: socket.socket, request=None) -> None:
    """Close with a TCP RST instead of a FIN."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def full_listener():
    """A port whose accept queue is full: connecting to it hangs until the client gives up."""
    with socket.create_server(("127.0.0.1", 0), backlog=0) as listener:
        filler = socket.create_connection(listener.getsockname())
        try:
            yield listener.getsockname()[1]
        finally:
            filler.close()


@pytest.fixture
def released():
    """An event set when the test ends: a reply that waits on it stalls as long as the test runs."""
    event = threading.Event()
    yield event
    event.set()


def host(server) -> str:
    return f"127.0.0.1:{server.port}"


def cut(text: str, room: int) -> str:
    """The contract's rule for a server's message in a line: cut with … to fit."""
    return text if len(text) <= room else text[: room - 1] + "…"


class TestRetries:
    def test_5xx_is_retried_with_backoff_and_one_short_warning_per_retry(self, cli, server):
        server.reply(error(503, "the upstream model is still loading"), error(502), OK)
        done = cli("--base-url", server.url, "q")
        assert (done.code, done.out) == (0, "recovered\n")
        assert len(server.requests) == 3 and server.bodies[0] == server.bodies[2]
        first, second = cli.waits
        assert 0.375 <= first <= 0.5 and 0.75 <= second <= 1.0
        assert done.err == (
            f"warning: HTTP 503; retrying in {first:.1f} s (2 of 3)\n"
            f"warning: HTTP 502; retrying in {second:.1f} s (3 of 3)\n"
        )

    @pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 504, 529])
    def test_retryable_statuses(self, cli, server, status):
        server.reply(error(status), OK)
        done = cli("--base-url", server.url, "q")
        assert (done.code, done.out) == (0, "recovered\n")
        assert len(server.requests) == 2
        assert done.err == f"warning: HTTP {status}; retrying in {cli.waits[0]:.1f} s (2 of 3)\n"

    @pytest.mark.parametrize(
        "status, reason",
        [
            (400, "Bad Request"),
            (401, "Unauthorized"),
            (403, "Forbidden"),
            (422, "Unprocessable Entity"),
        ],
    )
    def test_client_errors_are_not_retried(self, cli, server, status, reason):
        server.reply(error(status, "no", reason=reason), OK)
        done = cli("--base-url", server.url, "q")
        assert (done.code, done.out, done.err) == (1, "", f"error: HTTP {status} {reason}: no\n")
        assert len(server.requests) == 1 and cli.waits == []

    @pytest.mark.parametrize("field", ["code", "type"])
    def test_insufficient_quota_is_not_retried(self, cli, server, field):
        server.reply(
            error(429, "You exceeded your current quota.", **{field: "insufficient_quota"}), OK
        )
        done = cli("--base-url", server.url, "q")
        assert (done.code, done.err) == (
            1,
            (
                "error: HTTP 429 Too Many Requests: You exceeded your current "
                "quota. (the account is out of quota: add credit, retrying "
                "will not help)\n"
            ),
        )
        assert len(server.requests) == 1 and cli.waits == []

    @pytest.mark.parametrize(
        "headers, wait",
        [
            ("retry-after-ms: 1250\r\n", 1.25),
            ("Retry-After: 3\r\n", 3.0),
            ("Retry-After: 0\r\n", 0.0),
            ("retry-after-ms: 700\r\nRetry-After: 9\r\n", 0.7),
            ("Retry-After: 120\r\n", 120.0),
        ],
    )
    def test_the_server_chooses_the_wait(self, cli, server, headers, wait):
        server.reply(error(429, headers=headers), OK)
        done = cli("--base-url", server.url, "q")
        assert (done.code, done.out) == (0, "recovered\n")
        assert cli.waits == [wait]
        assert done.err == f"warning: HTTP 429; retrying in {wait:.1f} s (2 of 3)\n"

    @pytest.mark.parametrize(
        "seconds, clock",
        [
            ("600", r"\d\d:\d\d:\d\d"),
            ("99999999999999", r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"),  # the date too, and no overflow
        ],
    )
    def test_a_longer_wait_is_no_retry_but_says_when_to_try_again(
        self, cli, server, seconds, clock
    ):
        server.reply(error(429, "slow down", headers=f"Retry-After: {seconds}\r\n"), OK)
        done = cli("--base-url", server.url, "q")
        assert (done.code, done.out) == (1, "")
        assert re.fullmatch(
            rf"error: HTTP 429 Too Many Requests: slow down \(the server asks to wait "
            rf"{seconds} s: try again after {clock}\)\n",
            done.err,
        ), done.err
        assert len(server.requests) == 1 and cli.waits == []

    @pytest.mark.parametrize(
        "status, header, code, out, err",
        [
            (503, "false", 1, "", "error: HTTP 503 Service Unavailable: try later\n"),
            (
                400,
                "true",
                0,
                "recovered\n",
                "warning: HTTP 400; retrying in {wait:.1f} s (2 of 3)\n",
            ),
        ],
    )
    def test_x_should_retry_wins_over_the_status(self, cli, server, status, header, code, out, err):
        server.reply(error(status, headers=f"X-Should-Retry: {header}\r\n"), OK)
        done = cli("--base-url", server.url, "q")
        assert (done.code, done.out, done.err) == (
            code,
            out,
            err.format(wait=(cli.waits or [0])[0]),
        )
        assert len(server.requests) == 2 - code

    def test_giving_up_shows_the_servers_message_only_in_the_error(self, cli, server):
        message = (
            "The server had an error while processing your request. Sorry about that! You can "
            "retry your request, or contact us through our help center if the error persists"
        )
        assert len(message) == 160
        server.reply(error(500, message))
        done = cli("--base-url", server.url, "--retries", "3", "q")
        assert (done.code, done.out) == (1, "")
        assert len(server.requests) == 4 and len(cli.waits) == 3
        assert done.err.splitlines() == [
            *(
                f"warning: HTTP 500; retrying in {wait:.1f} s ({n} of 4)"
                for n, wait in enumerate(cli.waits, 2)
            ),
            f"error: HTTP 500 Internal Server Error: {message}",
        ]

    def test_retries_0_sends_once(self, cli, server):
        server.reply(error(503), OK)
        done = cli("--base-url", server.url, "--retries", "0", "q")
        assert (done.code, done.err) == (1, "error: HTTP 503 Service Unavailable: try later\n")
        assert len(server.requests) == 1 and cli.waits == []

    def test_a_connection_reset_before_the_reply_is_retried(self, cli, server):
        server.reply(reset, OK)
        done = cli("--base-url", server.url, "q")
        assert (done.code, done.out) == (0, "recovered\n")
        assert len(server.requests) == 2
        assert done.err == (
            f"warning: cannot reach {host(server)}: Connection reset by peer; retrying in "
            f"{cli.waits[0]:.1f} s (2 of 3)\n"
        )

    def test_a_refused_connection_is_retried_then_exits_3(self, cli):
        port = free_port()
        done = cli("--base-url", f"http://127.0.0.1:{port}/v1", "--retries", "1", "q")
        assert (done.code, done.out) == (3, "")
        assert done.err.splitlines() == [
            (
                f"warning: cannot reach 127.0.0.1:{port}: Connection refused; retrying in "
                f"{cli.waits[0]:.1f} s (2 of 2)"
            ),
            f"error: cannot reach 127.0.0.1:{port}: Connection refused",
        ]

    @pytest.mark.parametrize(
        "errno, message, tries",
        [
            (socket.EAI_NONAME, "Name or service not known", 1),  # NXDOMAIN: no such host
            (socket.EAI_AGAIN, "Temporary failure in name resolution", 2),
        ],
        ids=["no such host", "temporary"],
    )
    def test_a_name_that_does_not_exist_is_not_retried_a_temporary_failure_is(
        self, cli, monkeypatch, errno, message, tries
    ):
        # The resolver answers from here: no DNS query leaves the machine.
        real = socket.getaddrinfo

        def getaddrinfo(name, *args, **kwargs):
            if str(name).endswith(".invalid"):
                raise socket.gaierror(errno, message)
            return real(name, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        done = cli("--base-url", "https://no-such-host.invalid/v1", "--retries", "1", "q")
        assert (done.code, done.out) == (3, "")
        line = f"cannot resolve host no-such-host.invalid: {message}"
        assert done.err.splitlines() == [
            f"warning: {line}; retrying in {wait:.1f} s (2 of 2)" for wait in cli.waits
        ] + [f"error: {line}"]
        assert len(cli.waits) == tries - 1

    def test_a_stream_that_breaks_before_any_text_is_retried(self, cli, server):
        def role_then_reset(conn, request):
            conn.sendall(SSE_HEAD + chunk_of(chunk("", role="assistant")))
            nap(0.1)
            reset(conn)

        server.reply(role_then_reset, sse_response(stream_events("second ", "try")))
        done = cli("--base-url", server.url, "--stream", "q")
        assert (done.code, done.out) == (0, "second try\n")
        assert len(server.requests) == 2
        assert done.err == (
            f"warning: the connection to {host(server)} broke off mid-reply: Connection "
            f"reset by peer; retrying in {cli.waits[0]:.1f} s (2 of 3)\n"
        )

    def test_no_retry_once_the_stream_has_printed_and_the_text_stays(self, cli, server):
        def text_then_reset(conn, request):
            conn.sendall(SSE_HEAD + chunk_of(chunk("kept ") + chunk("text")))
            nap(0.1)
            reset(conn)

        server.reply(text_then_reset, OK)
        done = cli("--base-url", server.url, "--stream", "q")
        assert (done.code, done.out) == (3, "kept text\n")
        assert done.err == (
            f"error: the connection to {host(server)} broke off mid-reply: "
            "Connection reset by peer\n"
        )
        assert len(server.requests) == 1 and cli.waits == []


class TestTimeouts:
    """A read timeout is not retried: the server has the request, and sending it again doubles
    its work. Connecting that times out is retried: nothing reached the server."""

    STALLED_BODY = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n"
        b'{"choices": ['
    )

    @pytest.mark.parametrize(
        "first, args, out, message",
        [
            ("no answer", [], "", "did not answer within 0.3 s (--timeout)"),
            ("headers, then the body stalls", [], "", "did not answer within 0.3 s (--timeout)"),
            (
                "a stream stalls before any text",
                ["--stream"],
                "",
                "did not answer within 0.3 s (--timeout)",
            ),
            (
                "a stream stalls after text",
                ["--stream"],
                "before the stall\n",
                "did not answer within 0.3 s (--timeout)",
            ),
            (
                "a stream of keep-alives only",
                ["--stream"],
                "",
                "sent no data for 0.3 s, only keep-alives (--timeout)",
            ),
            (
                "no answer",
                ["--reasoning-effort", "high"],
                "",
                (
                    "did not answer within 0.3 s (--timeout) (a long think may need --stream or a "
                    "larger --timeout)"
                ),
            ),
        ],
        ids=[
            "no answer",
            "body stalls",
            "stream stalls before text",
            "stream stalls after text",
            "keep-alives only",
            "no answer while reasoning",
        ],
    )
    def test_a_read_timeout_is_not_retried(self, cli, server, released, first, args, out, message):
        def stall(head: bytes):
            def answer(conn, request):
                conn.sendall(head)
                released.wait(10)

            return answer

        def keep_alives(conn, request):
            conn.sendall(SSE_HEAD)
            while not released.wait(0.05):
                conn.sendall(chunk_of(b": ping\n\n"))

        firsts = {
            "no answer": stall(b""),
            "headers, then the body stalls": stall(self.STALLED_BODY),
            "a stream stalls before any text": stall(
                SSE_HEAD + chunk_of(chunk("", role="assistant"))
            ),
            "a stream stalls after text": stall(SSE_HEAD + chunk_of(chunk("before the stall"))),
            "a stream of keep-alives only": keep_alives,
        }
        server.reply(firsts[first], OK)  # a retry would have succeeded
        done = cli("--base-url", server.url, "--timeout", "0.3", "--retries", "2", *args, "q")
        assert (done.code, done.out, done.err) == (4, out, f"error: {host(server)} {message}\n")
        assert len(server.requests) == 1 and cli.waits == []

    def test_a_connect_timeout_is_retried(self, cli, monkeypatch):
        monkeypatch.setattr(chat, "CONNECT_TIMEOUT", 0.15)
        with full_listener() as port:
            started = time.monotonic()
            done = cli("--base-url", f"http://127.0.0.1:{port}/v1", "--retries", "1", "q")
        assert time.monotonic() - started < 3
        assert (done.code, done.out) == (4, "")
        assert done.err.splitlines() == [
            (
                f"warning: could not connect to 127.0.0.1:{port} within 0.15 s; retrying in "
                f"{cli.waits[0]:.1f} s (2 of 2)"
            ),
            f"error: could not connect to 127.0.0.1:{port} within 0.15 s",
        ]

    def test_a_smaller_timeout_shortens_connecting_too(self, cli):
        with full_listener() as port:
            done = cli(
                "--base-url",
                f"http://127.0.0.1:{port}/v1",
                "--timeout",
                "0.25",
                "--retries",
                "0",
                "q",
            )
        assert (done.code, done.err) == (
            4,
            f"error: could not connect to 127.0.0.1:{port} within 0.25 s\n",
        )

    def test_a_slow_answer_is_not_cut_short_by_the_connect_wait(self, cli, server, monkeypatch):
        monkeypatch.setattr(chat, "CONNECT_TIMEOUT", 0.1)
        server.reply(lambda conn, request: (nap(0.4), conn.sendall(OK)))
        done = cli("--base-url", server.url, "--retries", "0", "q")
        assert (done.code, done.out, done.err) == (0, "recovered\n", "")

    def test_reads_wait_ten_minutes_and_connecting_fifteen_seconds_by_default(self):
        assert chat.build_parser().parse_args(["q"]).timeout == 600
        assert chat.CONNECT_TIMEOUT == 15


class TestBrokenServers:
    @pytest.mark.parametrize(
        "args, sent, out",
        [
            (["--stream"], SSE_HEAD + chunk_of(chunk("so far")) + b'40\r\ndata: {"cho', "so far\n"),
            (
                [],
                (
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 500\r\n\r\n"
                    b'{"choices": ['
                ),
                "",
            ),
        ],
        ids=["chunked stream", "content-length"],
    )
    def test_a_body_cut_short_is_a_broken_connection(self, cli, server, args, sent, out):
        def cut_short(conn, request):
            conn.sendall(sent)
            conn.shutdown(socket.SHUT_WR)

        server.reply(cut_short)
        done = cli("--base-url", server.url, "--retries", "0", *args, "q")
        assert (done.code, done.out) == (3, out)
        assert done.err == f"error: the connection to {host(server)} broke off mid-reply\n"

    def test_a_proxys_html_error_page_without_a_reason_phrase(self, cli, server):
        page = (
            b"<!DOCTYPE html><html><head><title>Error 524: A timeout occurred</title>"
            b"<script>var x = '<b>';</script></head><body>"
            + b"<div>cloud</div>" * 500
            + b"</body></html>"
        )
        server.reply(http_response(524, page, "text/html", reason=""))
        done = cli("--base-url", server.url, "--retries", "0", "q")
        assert (done.code, done.out, done.err) == (
            1,
            "",
            "error: HTTP 524: Error 524: A timeout occurred\n",
        )

    def test_a_server_that_does_not_speak_http_is_not_retried(self, cli, server):
        server.reply(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        done = cli("--base-url", server.url, "q")
        assert (done.code, done.out) == (1, "")
        assert (
            done.err
            == f"error: {host(server)} did not answer in HTTP: 'SSH-2.0-OpenSSH_9.6\\r\\n'\n"
        )
        assert len(server.requests) == 1  # it would answer the same again


class TestContextOverflow:
    """A question the model's context cannot hold: the way out is a new conversation or fewer
    tokens to generate, not a retry."""

    HINTS: ClassVar[dict] = {
        3: "(this conversation's 3 turns and the question fill the model's context: start a new "
        "conversation (no -c))",
        0: "(the question alone fills the model's context: shorten the question)",
    }
    BUDGET = ", or set a smaller --max-tokens)"  # where the server names the completion's share
    OVERFLOWS: ClassVar[dict] = {
        "OpenAI": {
            "message": "This model's maximum context length is 8192 tokens. However, your messages "
            "resulted in 9000 tokens. Please reduce the length of the messages.",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        },
        "OpenAI, the code alone": {
            "message": "Input tokens exceed the configured limit of 272000 tokens. "
            "Your messages resulted in 280000 tokens. Please reduce the length of the messages.",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        },
        "llama-server": {
            "code": 400,
            "message": "the request exceeds the available context size, try increasing it",
            "type": "exceed_context_size_error",
            "n_prompt_tokens": 4500,
            "n_ctx": 4096,
        },
        "llama-cpp-python": {
            "message": "This model's maximum context length is 2048 tokens. However, you "
            "requested 2100 tokens (2000 in the messages, 100 in the completion). Please reduce "
            "the length of the messages or completion.",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        },
        "llama-cpp-python, raw": {
            "message": "Requested tokens (2100) exceed context window of 2048",
            "type": "internal_server_error",
        },
    }

    def expected(self, provider: str, turns: int) -> str:
        hint = self.HINTS[turns]
        if "completion" in self.OVERFLOWS[provider]["message"]:
            hint = hint[:-1] + self.BUDGET
        text = f"HTTP 400 Bad Request: {self.OVERFLOWS[provider]['message']}"
        return f"error: {cut(text, 300 - len('error: ') - len(' ' + hint))} {hint}\n"

    def save_turns(self, count: int) -> None:
        if not count:
            return
        folder = os.environ["CHAT_PY_HOME"]
        os.makedirs(folder, mode=0o700)
        turns = [
            {
                "time": f"2026-01-0{n}T10:00:00Z",
                "model": "test-model",
                "user": {"role": "user", "content": f"question {n}"},
                "assistant": f"answer {n}",
            }
            for n in range(1, count + 1)
        ]
        path = os.path.join(folder, "long-talk.jsonl")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as file:
            file.write("".join(json.dumps(turn) + "\n" for turn in turns))

    @pytest.mark.parametrize("turns", [3, 0])
    @pytest.mark.parametrize("provider", OVERFLOWS)
    def test_an_overflow_names_the_turns_and_the_way_out(self, cli, server, provider, turns):
        self.save_turns(turns)
        server.reply(json_response({"error": self.OVERFLOWS[provider]}, 400))
        done = cli("--base-url", server.url, *(["-c"] if turns else []), "and one more")
        assert (done.code, done.out, done.err) == (1, "", self.expected(provider, turns))
        assert len(server.requests) == 1 and len(server.bodies[0]["messages"]) == 2 * turns + 1

    def test_a_bad_request_about_something_else_gets_no_hint(self, cli, server):
        server.reply(
            json_response(
                {
                    "error": {
                        "message": "Unsupported value: 'temperature' does not "
                        "support 0.2 with this model."
                    }
                },
                400,
            )
        )
        done = cli("--base-url", server.url, "q")
        assert (done.code, done.err) == (
            1,
            (
                "error: HTTP 400 Bad Request: Unsupported value: 'temperature' "
                "does not support 0.2 with this model.\n"
            ),
        )


def echo_key(conn, request):
    """A 401 whose message quotes the Authorization header it got."""
    conn.sendall(
        error(
            401,
            f"Incorrect API key provided: {request.headers['authorization']}",
            reason="Unauthorized",
        )
    )


def echo_key_mid_stream(conn, request):
    """A stream whose error event quotes the Authorization header it got."""
    event = (
        b'data: {"error": {"message": "bad '
        + request.headers["authorization"].encode()
        + b'"}}\n\n'
    )
    conn.sendall(SSE_HEAD + chunk_of(chunk("hi ")) + chunk_of(event) + END_CHUNKS)


class TestKeySafety:
    KEY = "sk-test-DISTINCTIVE-fake-key-7731"

    CASES: ClassVar[dict] = {  # reply, arguments, exit code, stdout, the last stderr line
        "echoed in an error": (
            echo_key,
            [],
            1,
            "",
            "error: HTTP 401 Unauthorized: Incorrect API key provided: Bearer [redacted]",
        ),
        "echoed mid-stream": (
            echo_key_mid_stream,
            ["--stream"],
            1,
            "hi \n",
            "error: the server reported an error mid-stream: bad Bearer [redacted]",
        ),
        "in a retried 503": (
            error(503, f"upstream said {KEY}"),
            [],
            1,
            "",
            "error: HTTP 503 Service Unavailable: upstream said [redacted]",
        ),
        "in an HTML page": (
            json_response(f"<h1>{KEY}</h1>".encode(), 500),
            [],
            1,
            "",
            "error: HTTP 500 Internal Server Error: [redacted]",
        ),
        "a reset": (reset, [], 3, "", "error: cannot reach {host}: Connection reset by peer"),
        "refused": (None, [], 3, "", "error: cannot reach {host}: Connection refused"),
    }

    @pytest.mark.parametrize("verbose", [[], ["-v"]], ids=["plain", "verbose"])
    @pytest.mark.parametrize("case", CASES)
    def test_the_key_never_appears_in_any_output(self, cli, server, case, verbose):
        reply, args, code, out, last = self.CASES[case]
        url = server.url
        if reply is None:
            url = f"http://127.0.0.1:{free_port()}/v1"
        else:
            server.reply(reply)
        done = cli("--base-url", url, "--retries", "1", *verbose, *args, "q", key=self.KEY)
        assert self.KEY not in done.out + done.err and "DISTINCTIVE" not in done.err
        assert (done.code, done.out) == (code, out)
        assert done.err.splitlines()[-1] == last.format(host=url[len("http://") : -len("/v1")])

    @pytest.mark.parametrize(
        "key, authorization",
        [
            (FAKE_KEY, f"Bearer {FAKE_KEY}"),
            (None, None),
        ],
        ids=["the key wins", "no key: nothing"],
    )
    def test_a_netrc_entry_is_never_sent(self, cli, server, key, authorization):
        netrc = os.path.join(os.environ["HOME"], ".netrc")
        with open(os.open(netrc, os.O_WRONLY | os.O_CREAT, 0o600), "w") as file:
            file.write("machine 127.0.0.1 login netrc-user password netrc-pass\n")
        done = cli("--base-url", server.url, "q", key=key)
        assert (done.code, done.out, done.err) == (0, "Hello!\n", "")
        assert server.requests[0].headers.get("authorization") == authorization

    @pytest.mark.parametrize(
        "key, warning",
        [
            (
                FAKE_KEY,
                "warning: sending the API key unencrypted to models.example.test over http://\n",
            ),
            (None, ""),
        ],
    )
    def test_plain_http_to_another_machine_warns_when_a_key_goes(
        self, cli, server, monkeypatch, key, warning
    ):
        # The other machine is reached through a proxy on 127.0.0.1: nothing leaves this one.
        monkeypatch.setenv("HTTP_PROXY", server.url.removesuffix("/v1"))
        monkeypatch.setenv("NO_PROXY", "")
        done = cli("--base-url", "http://models.example.test/v1", "q", key=key)
        assert (done.code, done.out, done.err) == (0, "Hello!\n", warning)
        assert server.requests[0].path == "http://models.example.test/v1/chat/completions"


class TestLongServerText:
    """A server that echoes the whole request in its error (llama-cpp-python does, Base64 image
    included) still gives short lines."""

    @staticmethod
    def echo_request(conn, request):
        message = f"Invalid request: {json.dumps(request.body)}" + " and more" * 20_000
        conn.sendall(error(500, message))

    def test_every_line_is_short_and_the_image_is_elided(self, cli, server, tmp_path):
        noise((400, 400)).save(tmp_path / "big.png")
        server.reply(self.echo_request)
        done = cli("--base-url", server.url, "--image", "big.png", "q")
        assert (done.code, done.out) == (1, "")
        warnings, last = done.err.splitlines()[:-1], done.err.splitlines()[-1]
        assert warnings == [
            f"warning: HTTP 500; retrying in {wait:.1f} s ({n} of 3)"
            for n, wait in enumerate(cli.waits, 2)
        ]
        url = server.bodies[0]["messages"][0]["content"][1]["image_url"]["url"]
        assert len(url) > 100_000
        prefix = "data:image/jpeg;base64,"
        elided = f"{prefix}…({len(url) - len(prefix):,} characters)"
        echoed = json.dumps(server.bodies[0]).replace(url, elided)
        assert echoed.startswith(
            '{"model": "gpt-5.4-mini", "messages": [{"role": "user", "content": ['
        )
        message = f"Invalid request: {echoed}" + " and more" * 30
        hint = " (this server may not take images)"  # the message names the image part
        assert (
            last == cut(f"error: HTTP 500 Internal Server Error: {message}", 300 - len(hint)) + hint
        )

    def test_the_trace_elides_and_cuts_too(self, cli, server, tmp_path):
        noise((400, 400)).save(tmp_path / "big.png")
        server.reply(self.echo_request)
        done = cli("-v", "--base-url", server.url, "--retries", "0", "--image", "big.png", "q")
        assert done.code == 1
        lines = done.err.splitlines()
        assert len(done.err) < 20_000 and max(map(len, lines)) < 1100
        assert '<   "error": {' in lines
        message = next(line for line in lines if line.startswith('<     "message": '))
        assert re.fullmatch(
            r'<     "message": "Invalid request: \{\\"model\\": \\"gpt-5.4-mini\\", .*'
            r'\\"url\\": \\"data:image/jpeg;base64,…\([\d,]+ characters\)\\".*'
            r' and more …\([\d,]+ characters\)",',
            message,
        ), message
        assert len(message) < 600


def noise(size) -> Image.Image:
    """A photo-like image: every pixel different, so it compresses badly."""
    return Image.merge("RGB", [Image.effect_noise(size, 60) for _ in range(3)])


# ------------------------------------------------------------------ real processes

READ_SYSCALL = {"x86_64": 0, "aarch64": 63}.get(platform.machine())


def wait_until_reading_stdin(pid: int, seconds: float = 10) -> None:
    """Until the process blocks in read(0, ...): past its imports, reading the piped question.
    Where /proc/PID/syscall cannot say so, a second has to do."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/syscall") as file:
                fields = file.read().split()
        except OSError:
            fields = None
        if fields is None or READ_SYSCALL is None:
            nap(1)
            return
        if fields[:2] == [str(READ_SYSCALL), "0x0"]:
            return
        nap(0.01)
    raise AssertionError("chat.py never read its stdin")


def interrupt(process: subprocess.Popen) -> tuple[int, bytes, bytes]:
    """Press Ctrl-C: the exit status and what remains of stdout and stderr."""
    process.send_signal(signal.SIGINT)
    if process.stdin and process.stdin.closed:
        process.stdin = None  # nothing more to send
    out, err = process.communicate(timeout=10)  # and the pipes are closed
    return process.returncode, out, err


class TestInterrupts:
    """Ctrl-C is SIGINT to a real process: exit 130, a newline on stderr, no traceback."""

    def test_ctrl_c_while_waiting_for_the_server(self, cli, server, released):
        server.reply(lambda conn, request: released.wait(10))
        process = cli.process("--base-url", server.url, "q", start=True)
        process.stdin.close()
        server.wait_for_requests(1)
        assert interrupt(process) == (130, b"", b"\n")

    def test_ctrl_c_mid_stream_keeps_the_text(self, cli, server, released):
        def partial(conn, request):
            conn.sendall(SSE_HEAD + chunk_of(chunk("partial")))
            released.wait(10)

        server.reply(partial)
        process = cli.process("--base-url", server.url, "--stream", "q", start=True)
        process.stdin.close()
        assert process.stdout.read(len("partial")) == b"partial"
        assert interrupt(process) == (130, b"", b"\n")  # the text stays as it was: no newline added
        assert saved() == {}  # an interrupted reply is not kept

    def test_ctrl_c_before_the_request(self, cli, server):
        process = cli.process("--base-url", server.url, "q", start=True)  # stdin stays open
        wait_until_reading_stdin(process.pid)
        assert interrupt(process) == (130, b"", b"\n")
        assert server.requests == []


class TestClosedStdout:
    """`chat.py ... | head -c N`: the reader leaves early; chat.py ends quietly, exit 0."""

    @pytest.mark.parametrize(
        "args, reply",
        [
            # Over the 64 KiB a pipe holds, so chat.py is still writing when head leaves.
            (["--stream"], sse_response(*(chunk(f"word{n} " + "x" * 1000) for n in range(200)))),
            ([], json_response(completion("word0 " + "x" * 200_000))),
        ],
        ids=["streamed", "whole"],
    )
    def test_a_reader_that_leaves_early(self, cli, server, args, reply):
        server.reply(reply)
        command = (
            f"{sys.executable} {CHAT} --base-url {server.url} {' '.join(args)} q | head -c 12; "
            'echo " status=${PIPESTATUS[0]}"'
        )
        done = subprocess.run(
            ["bash", "-c", command],
            capture_output=True,
            env=cli.environ(FAKE_KEY, {}),
            cwd=cli.folder,
            timeout=30,
            check=False,
        )
        assert (done.stdout, done.stderr) == (b"word0 xxxxxx status=0\n", b"")


@pytest.mark.skipif(not hasattr(os, "set_blocking"), reason="no os.set_blocking here")
class TestNonBlockingStreams:
    """A parent may leave a pipe O_NONBLOCK (as Node.js leaves its terminal): a read then comes
    back empty-handed and a write short, and chat.py waits as on any other pipe."""

    def test_piped_text_that_comes_late(self, cli, server):
        server.reply(json_response(completion()))
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        process = subprocess.Popen(
            [sys.executable, str(CHAT), "--base-url", server.url, "Summarize"],
            stdin=read_end,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=cli.environ(FAKE_KEY, {}),
            cwd=cli.folder,
        )
        os.close(read_end)
        wait_until_reading_stdin(process.pid)
        os.write(write_end, b"the late text")
        os.close(write_end)
        out, err = process.communicate(timeout=30)
        assert (process.returncode, out, err) == (0, b"Hello!\n", b"")
        [body] = server.bodies
        assert body["messages"][-1]["content"] == "Summarize\n\nthe late text"

    @pytest.mark.parametrize("args", [[], ["--stream"]], ids=["whole", "streamed"])
    def test_a_reply_longer_than_the_pipe_holds(self, cli, server, args):
        words = [f"word{n} " + "x" * 1000 for n in range(200)]
        if args:
            server.reply(sse_response(stream_events(*words)))
        else:
            server.reply(json_response(completion("".join(words))))
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        process = subprocess.Popen(
            [sys.executable, str(CHAT), "--base-url", server.url, *args, "q"],
            stdin=subprocess.DEVNULL,
            stdout=write_end,
            stderr=subprocess.PIPE,
            env=cli.environ(FAKE_KEY, {}),
            cwd=cli.folder,
        )
        os.close(write_end)
        nap(1)  # the pipe fills while nobody reads it
        with open(read_end, "rb") as reader:
            out = reader.read()
        err = process.stderr.read()
        assert (process.wait(30), out, err) == (0, "".join(words).encode() + b"\n", b"")
        process.stderr.close()


class TestEndToEnd:
    """The exit code and stderr of a real process, whose retry waits are really slept."""

    def test_a_retried_503_then_the_reply(self, cli, server):
        server.reply(error(503, headers="retry-after-ms: 100\r\n"), OK)
        done = cli.process("--base-url", server.url, "q")
        assert (done.code, done.out, done.err) == (
            0,
            "recovered\n",
            "warning: HTTP 503; retrying in 0.1 s (2 of 3)\n",
        )
        assert len(server.requests) == 2

    def test_a_refused_connection_exits_3(self, cli):
        port = free_port()
        done = cli.process("--base-url", f"http://127.0.0.1:{port}/v1", "--retries", "0", "q")
        assert (done.code, done.out, done.err) == (
            3,
            "",
            f"error: cannot reach 127.0.0.1:{port}: Connection refused\n",
        )

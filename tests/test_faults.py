"""Retries, network faults, interrupts and a closed stdout: each ends with one line and its exit code."""

import contextlib
import json
import re
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest
from PIL import Image

from conftest import (CHAT, END_CHUNKS, FAKE_KEY, SSE_HEAD, child_env, chunk_event, chunked, completion,
                      json_response, stream_events)

OK = json_response(200, completion("recovered"))
# call_main replaces time.sleep (chat.py's retry waits); server threads keep the real one.
nap = time.sleep


def in_turn(*answers):
    """A raw_server handler that gives the n-th request the n-th answer (the last one repeats).
    An answer is bytes to send, or a callable(conn) that does something ruder."""
    count = []

    def handler(conn, request):
        answer = answers[min(len(count), len(answers) - 1)]
        count.append(1)
        if callable(answer):
            answer(conn)
        else:
            conn.sendall(answer)

    return handler


def reset(conn: socket.socket) -> None:
    """Close with a TCP RST instead of a FIN."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def error(status: int, message: str = "try later", headers: str = "", code=None, kind=None) -> bytes:
    body = {"error": {"message": message, "type": kind or "server_error", "code": code}}
    return json_response(status, body, headers=headers)


class TestRetries:
    def test_5xx_is_retried_with_backoff(self, call_main, raw_server):
        url, received = raw_server(in_turn(error(503), error(502), OK))
        done = call_main("--base-url", url, "q")
        assert (done.code, done.out) == (0, "recovered\n")
        assert len(received) == 3
        assert 0.375 <= call_main.waits[0] <= 0.5 and 0.75 <= call_main.waits[1] <= 1.0
        lines = done.err.splitlines()
        assert len(lines) == 2
        assert lines[0].startswith("warning: HTTP 503 Service Unavailable: try later; retrying in ")
        assert lines[0].endswith("(attempt 2 of 3)") and lines[1].endswith("(attempt 3 of 3)")

    @pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 504, 529])
    def test_retryable_statuses(self, call_main, raw_server, status):
        url, received = raw_server(in_turn(error(status), OK))
        assert call_main("--base-url", url, "q").code == 0
        assert len(received) == 2

    @pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
    def test_client_errors_are_not_retried(self, call_main, raw_server, status):
        url, received = raw_server(in_turn(error(status, "no"), OK))
        done = call_main("--base-url", url, "q")
        assert done.code == 1 and len(received) == 1 and call_main.waits == []
        assert done.err.startswith(f"error: HTTP {status} ")

    @pytest.mark.parametrize("field", ["code", "kind"])
    def test_insufficient_quota_is_not_retried(self, call_main, raw_server, field):
        answer = error(429, "You exceeded your current quota.", **{field: "insufficient_quota"})
        url, received = raw_server(in_turn(answer, OK))
        done = call_main("--base-url", url, "q")
        assert done.code == 1 and len(received) == 1
        assert "out of quota" in done.err and done.err.count("\n") == 1

    @pytest.mark.parametrize(
        "headers, wait",
        [("retry-after-ms: 1250\r\n", 1.25), ("Retry-After: 3\r\n", 3.0),
         ("Retry-After: 0\r\n", 0.0), ("retry-after-ms: 700\r\nRetry-After: 9\r\n", 0.7)],
    )
    def test_server_chosen_wait(self, call_main, raw_server, headers, wait):
        url, _ = raw_server(in_turn(error(429, headers=headers), OK))
        assert call_main("--base-url", url, "q").code == 0
        assert call_main.waits == [wait]

    def test_retry_after_as_http_date(self, call_main, raw_server):
        when = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 5))
        url, _ = raw_server(in_turn(error(503, headers=f"Retry-After: {when}\r\n"), OK))
        assert call_main("--base-url", url, "q").code == 0
        assert 3.0 <= call_main.waits[0] <= 5.0

    def test_too_long_a_wait_fails_and_says_when(self, call_main, raw_server):
        url, received = raw_server(in_turn(error(429, "slow down", headers="Retry-After: 600\r\n"), OK))
        done = call_main("--base-url", url, "q")
        assert done.code == 1 and len(received) == 1 and call_main.waits == []
        assert "slow down" in done.err and "600 s" in done.err and "try again after" in done.err

    def test_an_absurd_wait_is_explained_too(self, call_main, raw_server):
        url, received = raw_server(in_turn(error(503, headers="Retry-After: 99999999999999\r\n")))
        done = call_main("--base-url", url, "q")
        assert done.code == 1 and len(received) == 1
        assert done.err.startswith("error: HTTP 503 Service Unavailable: try later (the server asks ")

    def test_x_should_retry_false_wins(self, call_main, raw_server):
        url, received = raw_server(in_turn(error(503, headers="x-should-retry: false\r\n"), OK))
        assert call_main("--base-url", url, "q").code == 1
        assert len(received) == 1

    def test_x_should_retry_true_wins(self, call_main, raw_server):
        url, received = raw_server(in_turn(error(400, headers="X-Should-Retry: true\r\n"), OK))
        assert call_main("--base-url", url, "q").code == 0
        assert len(received) == 2

    def test_retries_give_up_with_the_last_error(self, call_main, raw_server):
        url, received = raw_server(in_turn(error(500, "boom")))
        done = call_main("--base-url", url, "--retries", "3", "q")
        assert done.code == 1 and len(received) == 4 and len(call_main.waits) == 3
        assert done.err.splitlines()[-1] == "error: HTTP 500 Internal Server Error: boom"

    def test_retries_zero(self, call_main, raw_server):
        url, received = raw_server(in_turn(error(503)))
        assert call_main("--base-url", url, "--retries", "0", "q").code == 1
        assert len(received) == 1 and call_main.waits == []

    def test_connection_reset_before_a_reply_is_retried(self, call_main, raw_server):
        url, received = raw_server(in_turn(reset, OK))
        done = call_main("--base-url", url, "q")
        assert (done.code, done.out) == (0, "recovered\n")
        assert len(received) == 2 and done.err.startswith("warning: cannot reach ")

    def test_timeout_is_retried(self, call_main, raw_server):
        url, received = raw_server(in_turn(lambda conn: nap(2), OK))
        done = call_main("--base-url", url, "--timeout", "0.3", "q")
        assert (done.code, done.out) == (0, "recovered\n")
        assert len(received) == 2 and "did not answer within 0.3 s" in done.err

    def test_refused_connection_is_retried_then_exits_3(self, call_main):
        port = free_port()
        done = call_main("--base-url", f"http://127.0.0.1:{port}/v1", "--retries", "1", "q")
        assert done.code == 3
        assert done.err.splitlines() == [
            f"warning: cannot reach 127.0.0.1:{port}: Connection refused; retrying in "
            f"{call_main.waits[0]:.1f} s (attempt 2 of 2)",
            f"error: cannot reach 127.0.0.1:{port}: Connection refused",
        ]

    def test_a_stream_that_breaks_before_any_text_is_retried(self, call_main, raw_server):
        def role_then_reset(conn):
            conn.sendall(SSE_HEAD + chunked(chunk_event(role="assistant", content="")))
            nap(0.2)
            reset(conn)

        stream = SSE_HEAD + chunked(stream_events("second ", "try")) + END_CHUNKS
        url, received = raw_server(in_turn(role_then_reset, stream))
        done = call_main("--base-url", url, "--stream", "q")
        assert (done.code, done.out) == (0, "second try\n")
        assert len(received) == 2
        assert done.err.startswith("warning: the connection to ") and "(attempt 2 of 3)" in done.err

    def test_no_retry_once_the_stream_has_printed(self, call_main, raw_server):
        def half_then_reset(conn):
            conn.sendall(SSE_HEAD + chunked(chunk_event("half ")))
            nap(0.2)
            reset(conn)

        url, received = raw_server(in_turn(half_then_reset, OK))
        done = call_main("--base-url", url, "--stream", "q")
        assert done.code == 3
        assert done.out == "half \n"
        assert len(received) == 1 and call_main.waits == []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TestFaults:
    """Each fault through the real CLI: exit code, one stderr line, stdout kept."""

    def test_server_that_never_answers(self, run_chat, raw_server):
        url, _ = raw_server(lambda conn, request: nap(5))
        done = run_chat("--base-url", url, "--timeout", "0.5", "--retries", "0", "q")
        assert (done.code, done.out) == (4, "")
        assert done.err == f"error: {url[7:-3]} did not answer within 0.5 s (--timeout)\n"

    def test_closed_port(self, run_chat):
        done = run_chat("--base-url", f"http://127.0.0.1:{free_port()}/v1", "--retries", "0", "q")
        assert (done.code, done.out) == (3, "")
        assert done.err.startswith("error: cannot reach 127.0.0.1:") and "refused" in done.err

    def test_name_that_does_not_resolve(self, run_chat):
        done = run_chat("--base-url", "https://no-such-host.invalid/v1", "--retries", "0", "q")
        assert (done.code, done.out) == (3, "")
        assert done.err.startswith("error: cannot resolve host no-such-host.invalid")
        assert done.err.count("\n") == 1

    def test_reset_mid_stream_keeps_the_text(self, run_chat, raw_server):
        def handler(conn, request):
            conn.sendall(SSE_HEAD + chunked(chunk_event("kept ") + chunk_event("text")))
            nap(0.2)
            reset(conn)

        url, received = raw_server(handler)
        done = run_chat("--base-url", url, "--stream", "q")
        assert (done.code, done.out) == (3, "kept text\n")
        host = url[7:-3]
        assert done.err == f"error: the connection to {host} broke off mid-reply: Connection reset by peer\n"
        assert done.err.count("\n") == 1 and len(received) == 1

    def test_chunked_body_cut_short(self, run_chat, raw_server):
        def handler(conn, request):
            conn.sendall(SSE_HEAD + chunked(chunk_event("so far")) + b"40\r\ndata: {\"cho")
            conn.shutdown(socket.SHUT_WR)

        url, _ = raw_server(handler)
        done = run_chat("--base-url", url, "--stream", "q")
        assert (done.code, done.out) == (3, "so far\n")
        assert "broke off mid-reply" in done.err and done.err.count("\n") == 1

    def test_stall_mid_stream_is_a_timeout(self, run_chat, raw_server):
        def handler(conn, request):
            conn.sendall(SSE_HEAD + chunked(chunk_event("before the stall")))
            nap(3)

        url, _ = raw_server(handler)
        done = run_chat("--base-url", url, "--stream", "--timeout", "0.5", "q")
        assert (done.code, done.out) == (4, "before the stall\n")
        assert done.err == f"error: {url[7:-3]} did not answer within 0.5 s (--timeout)\n"

    def test_non_streamed_body_stalls(self, run_chat, raw_server):
        def handler(conn, request):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 500\r\n\r\n{\"choices\": [")
            nap(3)

        url, _ = raw_server(handler)
        done = run_chat("--base-url", url, "--timeout", "0.5", "--retries", "0", "q")
        assert (done.code, done.out) == (4, "")
        assert "did not answer within 0.5 s" in done.err

    def test_html_error_from_a_proxy(self, run_chat, raw_server):
        page = (b"<!DOCTYPE html><html><head><title>Error 524: A timeout occurred</title>"
                b"<script>var x = '<b>';</script></head><body>" + b"<div>cloud</div>" * 500
                + b"</body></html>")
        answer = (b"HTTP/1.1 524 \r\nContent-Type: text/html\r\nConnection: close\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(page) + page)
        url, received = raw_server(in_turn(answer))
        done = run_chat("--base-url", url, "--retries", "0", "q")
        assert (done.code, done.out) == (1, "")
        assert done.err == "error: HTTP 524 : Error 524: A timeout occurred\n"

    def test_invalid_http_from_the_server(self, run_chat, raw_server):
        url, received = raw_server(in_turn(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"))
        done = run_chat("--base-url", url, "q")
        assert (done.code, done.out) == (1, "")
        assert done.err == f"error: {url[7:-3]} did not answer in HTTP: 'SSH-2.0-OpenSSH_9.6\\r\\n'\n"
        assert len(received) == 1  # not retried: it would answer the same again


def wait_for_request(received, seconds=10):
    deadline = time.monotonic() + seconds
    while not received and time.monotonic() < deadline:
        nap(0.02)
    assert received, "the request never arrived"


def start_chat(url, *args, stdin=subprocess.DEVNULL, tmp_path=None):
    return subprocess.Popen(
        [sys.executable, str(CHAT), "--base-url", url, *args], stdin=stdin,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
        env=child_env(),
    )


class TestInterrupts:
    def test_ctrl_c_while_waiting_for_the_server(self, raw_server, tmp_path):
        url, received = raw_server(lambda conn, request: nap(10))
        process = start_chat(url, "q", tmp_path=tmp_path)
        wait_for_request(received)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=10)
        assert (process.returncode, out, err) == (130, b"", b"\n")

    def test_ctrl_c_mid_stream_keeps_the_text(self, raw_server, tmp_path):
        def handler(conn, request):
            conn.sendall(SSE_HEAD + chunked(chunk_event("partial")))
            nap(10)

        url, _ = raw_server(handler)
        process = start_chat(url, "--stream", "q", tmp_path=tmp_path)
        assert process.stdout.read(len("partial")) == b"partial"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=10)
        assert (process.returncode, out, err) == (130, b"", b"\n")

    def test_ctrl_c_before_the_request(self, raw_server, tmp_path):
        url, received = raw_server(lambda conn, request: None)
        process = start_chat(url, "q", stdin=subprocess.PIPE, tmp_path=tmp_path)
        nap(0.5)  # it is now reading the piped stdin, which never ends
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=10)
        assert (process.returncode, out, err) == (130, b"", b"\n")
        assert received == []

    def test_stdout_closed_early_is_quiet(self, raw_server, tmp_path):
        deltas = [chunk_event(f"word{n} ") for n in range(2000)]

        def handler(conn, request):
            conn.sendall(SSE_HEAD)
            for delta in deltas:
                conn.sendall(chunked(delta))
                nap(0.001)
            conn.sendall(END_CHUNKS)

        url, _ = raw_server(handler)
        done = subprocess.run(
            f"{sys.executable} {CHAT} --base-url {url} --stream q | head -c 20; "
            "echo \" status=${PIPESTATUS[0]}\"",
            shell=True, executable="/bin/bash", capture_output=True, cwd=tmp_path, timeout=30,
            env=child_env(),
        )
        assert done.stdout == b"word0 word1 word2 wo status=0\n"
        assert done.stderr == b""

    def test_stdout_closed_before_a_plain_reply(self, raw_server, tmp_path):
        url, _ = raw_server(in_turn(json_response(200, completion("x" * 200_000))))
        done = subprocess.run(
            f"{sys.executable} {CHAT} --base-url {url} q | head -c 5; echo \" status=${{PIPESTATUS[0]}}\"",
            shell=True, executable="/bin/bash", capture_output=True, cwd=tmp_path, timeout=30,
            env=child_env(),
        )
        assert done.stdout == b"xxxxx status=0\n"
        assert done.stderr == b""


class TestKeySafety:
    KEY = "sk-test-DISTINCTIVE-fake-key-7731"

    def fault_servers(self, raw_server):
        """(name, base URL, extra args) for a spread of failures; some echo the key back."""

        def echo_key(conn, request):
            key = request["headers"].get("authorization", "")
            conn.sendall(error(401, f"Incorrect API key provided: {key}"))

        def echo_key_in_stream(conn, request):
            key = request["headers"].get("authorization", "")
            conn.sendall(SSE_HEAD + chunked(chunk_event("hi ")) + chunked(
                b'data: {"error": {"message": "bad ' + key.encode() + b'"}}\n\n') + END_CHUNKS)

        def stall(conn, request):
            conn.sendall(SSE_HEAD + chunked(chunk_event("x")))
            nap(2)

        return [
            ("echo in error", raw_server(echo_key)[0], []),
            ("echo mid-stream", raw_server(echo_key_in_stream)[0], ["--stream"]),
            ("retried 503", raw_server(in_turn(error(503, f"upstream {self.KEY}")))[0], []),
            ("reset", raw_server(lambda conn, request: reset(conn))[0], []),
            ("stall", raw_server(stall)[0], ["--stream", "--timeout", "0.5"]),
            ("refused", f"http://127.0.0.1:{free_port()}/v1", []),
            ("html", raw_server(in_turn(json_response(500, b"<h1>" + self.KEY.encode() + b"</h1>")))[0],
             []),
        ]

    def test_the_key_never_appears_in_any_output(self, run_chat, raw_server):
        for name, url, args in self.fault_servers(raw_server):
            for verbose in ([], ["-v"]):
                done = run_chat("--base-url", url, "--retries", "1", *args, *verbose, "q", key=self.KEY)
                assert done.code != 0, name
                assert self.KEY not in done.out + done.err, (name, verbose, done.err)
                assert "sk-test-DISTINCTIVE" not in done.err, (name, verbose)
                assert "Traceback" not in done.err

    def test_a_netrc_entry_does_not_replace_the_key(self, run_chat, httpserver, base_url, tmp_path):
        (tmp_path / ".netrc").write_text("machine 127.0.0.1 login netrc-user password netrc-pass\n")
        (tmp_path / ".netrc").chmod(0o600)
        httpserver.expect_request("/v1/chat/completions").respond_with_json(completion())
        done = run_chat("--base-url", base_url, "q", env={"HOME": str(tmp_path)})
        assert done.code == 0, done.err
        assert httpserver.log[0][0].headers["Authorization"] == f"Bearer {FAKE_KEY}"

    def test_a_redirect_to_another_host_drops_the_key(self, run_chat, raw_server):
        target, landed = raw_server(in_turn(OK))
        other_host = target.replace("127.0.0.1", "localhost") + "/chat/completions"
        redirect = (f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {other_host}\r\n"
                    "Content-Length: 0\r\n\r\n").encode()
        url, first = raw_server(in_turn(redirect))
        done = run_chat("--base-url", url, "q")
        assert (done.code, done.out) == (0, "recovered\n")
        assert first[0]["headers"]["authorization"] == f"Bearer {FAKE_KEY}"
        assert "authorization" not in landed[0]["headers"]
        assert landed[0]["body"]["messages"][0]["content"] == "q"

    def test_plain_http_to_a_remote_host_warns(self, run_chat, raw_server):
        # The "remote" host is reached through a proxy on 127.0.0.1, so nothing leaves this machine.
        proxy, received = raw_server(in_turn(OK))
        proxy = proxy.removesuffix("/v1")
        done = run_chat("--base-url", "http://models.example.test/v1", "q",
                        env={"HTTP_PROXY": proxy, "NO_PROXY": ""})
        assert (done.code, done.out) == (0, "recovered\n")
        assert done.err == "warning: sending the API key unencrypted to models.example.test over http://\n"
        assert received[0]["line"].startswith("POST http://models.example.test/v1/chat/completions ")

    def test_plain_http_to_loopback_or_without_a_key_does_not_warn(self, run_chat, raw_server):
        url, _ = raw_server(in_turn(OK))
        assert run_chat("--base-url", url, "q").err == ""
        proxy = url.removesuffix("/v1")
        done = run_chat("--base-url", "http://models.example.test/v1", "q", key=None,
                        env={"HTTP_PROXY": proxy, "NO_PROXY": ""})
        assert (done.code, done.err) == (0, "")


class TestLongServerText:
    """A server that echoes the whole request in its error (llama-cpp-python does, Base64 image
    included) still gives short lines: every error: and warning: line is at most 300 characters."""

    @staticmethod
    def echo_request(conn, request):
        message = f"Invalid request: {json.dumps(request['body'])}" + " and more" * 20_000
        conn.sendall(error(500, message))

    def test_every_line_is_short(self, run_chat, raw_server, tmp_path):
        noise((1500, 1500)).save(tmp_path / "big.png")
        url, received = raw_server(self.echo_request)
        done = run_chat("--base-url", url, "--detail", "original", "--image", "big.png", "q")
        assert (done.code, done.out) == (1, "")
        lines = done.err.splitlines()
        assert len(lines) == 3 and len(received) == 3  # two retry warnings, then the error
        assert all(len(line) <= 300 for line in lines), [len(line) for line in lines]
        assert lines[0].startswith('warning: HTTP 500 Internal Server Error: Invalid request: {"model": ')
        assert re.search(r'"url": "data:image/jpeg;base64,…\([\d,]+ characters\)"', lines[-1])
        assert lines[-1].startswith("error: HTTP 500 Internal Server Error: Invalid request: ")
        assert lines[-1].endswith("…") and lines[0].endswith("(attempt 2 of 3)")

    def test_the_trace_elides_and_cuts_too(self, run_chat, raw_server, tmp_path):
        noise((1000, 1000)).save(tmp_path / "big.png")
        url, received = raw_server(self.echo_request)
        done = run_chat("-v", "--base-url", url, "--retries", "0", "--detail", "original",
                        "--image", "big.png", "q")
        assert done.code == 1
        assert len(received[0]["body"]["messages"][0]["content"][1]["image_url"]["url"]) > 500_000
        assert len(done.err) < 20_000
        assert max(len(line) for line in done.err.splitlines()) < 1100
        assert '<   "error": {' in done.err  # the response body is in the trace, pretty-printed


class TestTimeouts:
    def test_reads_wait_ten_minutes_by_default(self):
        import chat

        assert chat.build_parser().parse_args(["q"]).timeout == 600

    def test_a_slow_answer_is_not_cut_short_by_the_connect_wait(self, call_main, raw_server, monkeypatch):
        import chat

        monkeypatch.setattr(chat, "CONNECT_TIMEOUT", 0.3)
        url, received = raw_server(in_turn(lambda conn: (nap(1.0), conn.sendall(OK))))
        done = call_main("--base-url", url, "--retries", "0", "q")
        assert (done.code, done.out, done.err) == (0, "recovered\n", "")

    def test_connecting_gives_up_after_the_connect_wait(self, call_main, monkeypatch):
        import chat

        monkeypatch.setattr(chat, "CONNECT_TIMEOUT", 0.3)
        with full_listener() as port:
            started = time.monotonic()
            done = call_main("--base-url", f"http://127.0.0.1:{port}/v1", "--retries", "0", "q")
        assert time.monotonic() - started < 3
        assert (done.code, done.err) == (4, f"error: could not connect to 127.0.0.1:{port} within 0.3 s\n")

    def test_a_smaller_timeout_shortens_connecting_too(self, run_chat):
        with full_listener() as port:
            started = time.monotonic()
            done = run_chat("--base-url", f"http://127.0.0.1:{port}/v1", "--timeout", "0.4", "--retries", "0",
                            "q")
        assert time.monotonic() - started < 5
        assert (done.code, done.err) == (4, f"error: could not connect to 127.0.0.1:{port} within 0.4 s\n")

    def test_a_timeout_while_reasoning_suggests_streaming(self, run_chat, raw_server):
        url, _ = raw_server(lambda conn, request: nap(3))
        done = run_chat("--base-url", url, "--timeout", "0.4", "--retries", "0", "--reasoning-effort", "high",
                        "q")
        assert done.code == 4
        assert done.err == (f"error: {url[7:-3]} did not answer within 0.4 s (--timeout) "
                            "(a long think may need --stream or a larger --timeout)\n")


def noise(size) -> Image.Image:
    """A photo-like image: every pixel different, so it compresses badly."""
    return Image.merge("RGB", [Image.effect_noise(size, 60) for _ in range(3)])


@contextlib.contextmanager
def full_listener():
    """A port whose listen queue is full: connecting to it hangs until the client gives up."""
    with socket.create_server(("127.0.0.1", 0), backlog=0) as server:
        filler = socket.create_connection(server.getsockname())
        try:
            yield server.getsockname()[1]
        finally:
            filler.close()

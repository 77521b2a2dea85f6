"""Server-Sent Events: the decoder on its own, then --stream end to end against the fake server,
then what v3 adds: one answer out of n, tool calls, bounded work, control characters."""

import io
import json
import os
import select
import threading
import time
from types import SimpleNamespace

import pytest
from conftest import (
    END_CHUNKS,
    FAKE_KEY,
    SSE_HEAD,
    chunk,
    chunk_of,
    completion,
    json_response,
    saved,
    sse_response,
    stream_events,
)

import chat

MIB = 2**20
DONE = b"data: [DONE]\n\n"
PING = b": ping\n\n"


def decode(*pieces: bytes) -> list[tuple[str, str]]:
    decoder = chat.SSEDecoder()
    return [event for piece in pieces for event in decoder.feed(piece)]


def raw_event(*choices: dict) -> bytes:
    """One data: event with the choices given as they are (several in one chunk, odd shapes)."""
    payload = {"object": "chat.completion.chunk", "choices": list(choices)}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def only_turn() -> dict:
    """The one turn saved so far."""
    [turns] = saved().values()
    [turn] = turns
    return turn


def run_with_stdout(cli, stdout, *args, ttys=(False, False, False)) -> SimpleNamespace:
    """chat.main() in this process, like the chat fixture, but writing to the stdout given."""
    stderr = io.StringIO()

    def no_typing(prompt=""):
        raise EOFError

    env = chat.Env(
        io.BytesIO(b""),
        stdout,
        stderr,
        cli.environ(FAKE_KEY, None),
        str(cli.folder),
        ttys,
        no_typing,
        cli.waits.append,
    )
    code = chat.main([str(arg) for arg in args], env)
    return SimpleNamespace(code=code, err=stderr.getvalue())


class TestDecoder:
    @pytest.mark.parametrize(
        "stream, expected",
        [
            (b"data: a\n\n", [("", "a")]),
            (b"data:a\n\n", [("", "a")]),
            (b"data:  two spaces\n\n", [("", " two spaces")]),
            (b"data: a\r\n\r\n", [("", "a")]),
            (b"data: a\r\rdata: b\r\r", [("", "a"), ("", "b")]),
            (b"data: first\ndata: second\n\n", [("", "first\nsecond")]),
            (b": keep-alive comment\n\ndata: x\n\n", [("", "x")]),
            (b"id: 7\nretry: 1000\nevent: message\ndata: x\n\n", [("message", "x")]),
            (b"event: error\ndata: {}\n\ndata: y\n\n", [("error", "{}"), ("", "y")]),
            (b"event: ping\n\n", []),
            (b"data\n\n", [("", "")]),
            (b"data: unfinished event", []),
            (b"data: no blank line\n", []),
            (b"\xef\xbb\xbfdata: bom\n\n", [("", "bom")]),
            (b"data: caf\xc3\xa9 \xe2\x80\xa8 sep\n\n", [("", "café \u2028 sep")]),
            (b"\n\n\ndata: z\n\n\n", [("", "z")]),
            (b"garbage line\nda ta: q\n\ndata: ok\n\n", [("", "ok")]),
        ],
    )
    def test_table(self, stream, expected):
        assert decode(stream) == expected

    def test_crlf_split_across_reads_is_one_line_end(self):
        assert decode(b"data: a\r", b"\n\r", b"\n") == [("", "a")]
        assert decode(b"data: a\r", b"\ndata: b\r\n\r\n") == [("", "a\nb")]

    def test_a_character_split_at_any_byte_stays_whole(self):
        data = 'data: {"c": "日本語 ☕"}\n\n'.encode()
        for cut in range(1, len(data)):
            assert decode(data[:cut], data[cut:]) == [("", '{"c": "日本語 ☕"}')]
        assert decode(*(data[i : i + 1] for i in range(len(data)))) == [("", '{"c": "日本語 ☕"}')]

    def test_a_20_mb_line_in_64_kib_reads_comes_out_whole(self):
        # Linear reading: the time this takes is a row of tests/benchmark.py, not asserted here.
        line = b"data: " + b"x" * (20 * MIB) + b"\n\n"
        [(event, data)] = decode(
            *(line[start : start + 64 * 1024] for start in range(0, len(line), 64 * 1024))
        )
        assert event == "" and len(data) == 20 * MIB and data == "x" * (20 * MIB)

    def test_an_event_over_64_mib_in_many_data_lines_is_an_api_error(self):
        # (One line over 64 MiB: TestBoundedWork, end to end.)
        # each line's newline counts: 64 of them make exactly 64 MiB
        decoder, line = chat.SSEDecoder(), b"data: " + b"y" * (MIB - 1) + b"\n"
        for _ in range(64):
            assert decoder.feed(line) == []
        with pytest.raises(chat.ApiError) as caught:
            decoder.feed(b"data: y\n")
        assert str(caught.value) == "an event in the stream is larger than 64 MiB"
        assert caught.value.exit_status == 1


class TestStreamingCli:
    def test_deltas_are_printed_and_the_body_asks_to_stream(self, cli, server):
        server.reply(sse_response(stream_events("Hel", "lo, ", "wörld")))
        done = cli("--base-url", server.url, "--stream", "hi")
        assert (done.code, done.out, done.err) == (0, "Hello, wörld\n", "")
        assert server.bodies[0]["stream"] is True
        assert only_turn()["assistant"] == "Hello, wörld"

    @pytest.mark.parametrize(
        "deltas, out",
        [
            (("line one\n", "line two\n"), "line one\nline two\n"),
            (("ends", "\n"), "ends\n"),
            ((), "\n"),
            (("no end",), "no end\n"),
        ],
    )
    def test_a_reply_ending_with_a_newline_gets_no_second_one(self, cli, server, deltas, out):
        server.reply(sse_response(stream_events(*deltas)))
        done = cli("--base-url", server.url, "--stream", "hi")
        assert (done.code, done.out, done.err) == (0, out, "")

    def test_each_delta_reaches_a_pipe_the_moment_it_arrives(self, cli, server):
        # A real process: the point is what a real pipe receives while the stream is open.
        release = threading.Event()

        def first_then_wait(conn, request):
            conn.sendall(SSE_HEAD + chunk_of(chunk("first ")))
            release.wait(10)
            conn.sendall(chunk_of(chunk("second") + DONE) + END_CHUNKS)

        server.reply(first_then_wait)
        process = cli.process("--base-url", server.url, "--stream", "hi", start=True)
        process.stdin.close()
        try:
            first = read_at_least(process.stdout, len(b"first "), seconds=10)
        finally:
            release.set()
        process.stdin = None  # closed above: nothing more to send
        rest, err = process.communicate(timeout=20)
        assert (first, rest, err, process.returncode) == (b"first ", b"second\n", b"", 0)

    def test_a_body_without_chunked_encoding_is_shown_as_it_arrives(self, cli, server):
        # Delimited by closing the connection, as HTTP/1.0 servers do: read as it comes, not at
        # the end.
        stdout, shown_early = WatchedStdout("early "), []

        def early_then_late(conn, request):
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
                + chunk("early ")
            )
            shown_early.append(stdout.seen.wait(10))
            conn.sendall(stream_events("late"))

        server.reply(early_then_late)
        done = run_with_stdout(cli, stdout, "--base-url", server.url, "--stream", "hi")
        assert (done.code, stdout.getvalue(), done.err, shown_early) == (
            0,
            "early late\n",
            "",
            [True],
        )

    @pytest.mark.parametrize(
        "raw",
        [
            # CR and CRLF line ends, no space after the colon, comments, other fields, data over
            # two lines
            (
                b': ping\r\rid: 1\r\nretry: 10\r\nevent: message\r\ndata:{"choices":[{"delta":\r\n'
                b'data: {"content":"o"}}]}\r\n\r\n'
                b'data:{"choices":[{"delta":{"content":"k"}}]}\r\r: bye\n\n'
            ),
            # chunks without choices, null content, a role only, usage only
            (
                b'data: {"choices":[]}\n\ndata: {"choices":[{"delta":{"content":null}}]}\n\n'
                b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n'
                b'data: {"choices":[{"delta":{}}]}\n\n'
                b'data: {"choices":[{"delta":{"content":"ok"}}]}\n\n'
                b'data: {"choices":[],"usage":{"total_tokens":3}}\n\n'
            ),
        ],
        ids=["line syntax", "chunks without text"],
    )
    def test_what_the_spec_and_servers_allow(self, cli, server, raw):
        server.reply(sse_response(raw, chunk(finish_reason="stop"), DONE))
        done = cli("--base-url", server.url, "--stream", "hi")
        assert (done.code, done.out, done.err) == (0, "ok\n", "")

    def test_done_ends_the_stream_at_once_and_nothing_after_it_is_shown(self, cli, server):
        hold = threading.Event()

        def done_then_hold(conn, request):
            conn.sendall(SSE_HEAD + chunk_of(stream_events("quick") + chunk("hidden")))
            hold.wait(30)

        server.reply(done_then_hold)
        try:
            done = cli("--base-url", server.url, "--stream", "--timeout", "30", "hi")
            held = not hold.is_set()
        finally:
            hold.set()
        assert (done.code, done.out, done.err, held) == (0, "quick\n", "", True)

    def test_utf8_without_charset_split_inside_characters(self, cli, server):
        event = chunk("日本語 café ☕ \u2028 end", ascii_only=False)
        assert "日本語".encode() in event  # raw UTF-8 on the wire, not \\u escapes
        server.reply(sse_response(*(event[i : i + 3] for i in range(0, len(event), 3)), DONE))
        done = cli("--base-url", server.url, "--stream", "hi")
        assert (done.code, done.out, done.err) == (0, "日本語 café ☕ \u2028 end\n", "")

    @pytest.mark.parametrize(
        "events, code, out, err",
        [
            (
                (
                    chunk("partial "),
                    chunk("text"),
                    (
                        b'data: {"error": {"message": "upstream overloaded", '
                        b'"type": "server_error"}}\n\n'
                    ),
                ),
                1,
                "partial text\n",
                "error: the server reported an error mid-stream: upstream overloaded\n",
            ),
            (
                (b'event: error\ndata: {"message": "quota"}\n\n',),
                1,
                "",
                "error: the server reported an error mid-stream: quota\n",
            ),
            (
                (chunk("ok "), b"data: {not json\n\n"),
                1,
                "ok \n",
                "error: malformed event in the stream: '{not json'\n",
            ),
            ((chunk("all "), chunk("there", "stop")), 0, "all there\n", ""),
            (
                (chunk("half"),),
                3,
                "half\n",
                "error: the connection closed before the reply was complete\n",
            ),
            (
                (chunk("cut"), chunk(finish_reason="length"), DONE),
                0,
                "cut\n",
                "warning: the reply was cut off at the token limit (finish_reason: length)\n",
            ),
            # The spec drops an event the end of the stream cut off before its blank line.
            (
                (chunk("kept", "stop"), b'data: {"choices":[{"delta":{"content":"lost"}}]}'),
                0,
                "kept\n",
                "",
            ),
        ],
        ids=[
            "error mid-stream",
            "named error event",
            "malformed event",
            "no DONE",
            "no DONE nor finish_reason",
            "length",
            "unfinished last event",
        ],
    )
    def test_how_a_stream_ends(self, cli, server, events, code, out, err):
        server.reply(sse_response(*events))
        done = cli("--base-url", server.url, "--stream", "hi")
        assert (done.code, done.out, done.err) == (code, out, err)

    def test_refusal_delta_is_shown(self, cli, server):
        server.reply(
            sse_response(
                raw_event({"delta": {"content": None, "refusal": "No."}}),
                chunk(finish_reason="stop"),
                DONE,
            )
        )
        done = cli("--base-url", server.url, "--stream", "hi")
        assert (done.code, done.out, done.err) == (0, "No.\n", "")

    @pytest.mark.parametrize(
        "stream, reply",
        [
            (True, json_response(completion("whole"))),
            (False, sse_response(stream_events("who", "le"))),
        ],
        ids=["JSON to --stream", "a stream to a plain request"],
    )
    def test_the_body_is_read_as_what_it_is_not_as_what_was_asked(self, cli, server, stream, reply):
        server.reply(reply)
        done = cli("--base-url", server.url, *(["--stream"] if stream else []), "hi")
        assert (done.code, done.out, done.err) == (0, "whole\n", "")
        assert server.bodies[0].get("stream") is (True if stream else None)


class WatchedStdout(io.StringIO):
    """A stdout whose `seen` is set once `wanted` has been written and flushed."""

    def __init__(self, wanted: str):
        super().__init__()
        self.wanted, self.seen = wanted, threading.Event()

    def flush(self):
        if self.wanted in self.getvalue():
            self.seen.set()


def read_at_least(pipe, count: int, seconds: float) -> bytes:
    """What a pipe delivers until it holds count bytes, or seconds pass."""
    data, deadline = b"", time.monotonic() + seconds
    while len(data) < count and time.monotonic() < deadline:
        if select.select([pipe], [], [], 0.1)[0]:
            data += os.read(pipe.fileno(), 1024)
    return data


# ------------------------------------------------------------------ v3: every provider's replies

N_WARNING = "warning: the server sent 3 choices (-o n); only the first is shown, 2 dropped\n"


class TestOneAnswer:
    def test_a_stream_of_three_choices_shows_choice_0(self, cli, server):
        server.reply(
            sse_response(
                *(chunk("", role="assistant", index=index) for index in range(3)),
                chunk("Zero ", index=0),
                chunk("One ", index=1),
                chunk("Two ", index=2),
                # one chunk holding two choices, choice 0 second: matched by index, not by place
                raw_event(
                    {"index": 1, "delta": {"content": "uno"}},
                    {"index": 0, "delta": {"content": "zero"}},
                ),
                chunk(finish_reason="length", index=2),
                chunk(finish_reason="stop", index=0),
                chunk(finish_reason="stop", index=1),
                DONE,
            )
        )
        done = cli("--base-url", server.url, "--stream", "-o", "n", "3", "hi")
        assert (done.code, done.out, done.err) == (0, "Zero zero\n", N_WARNING)
        assert server.bodies[0]["n"] == 3
        assert only_turn()["assistant"] == "Zero zero"

    @pytest.mark.parametrize(
        "index", [10**6, int("9" * 4300), "1", 1.5], ids=["1e6", "4300 digits", "text", "float"]
    )
    def test_an_index_no_n_could_give_counts_as_one_more_choice(self, cli, server, index):
        # 4,300 digits, one more than Python will write as text: the count was exit 70
        server.reply(
            sse_response(
                raw_event({"index": index, "delta": {"content": "x"}}),
                chunk("hi", finish_reason="stop"),
                DONE,
            )
        )
        done = cli("--base-url", server.url, "--stream", "q")
        warning = "warning: the server sent 2 choices (-o n); only the first is shown, 1 dropped\n"
        assert (done.code, done.out, done.err) == (0, "hi\n", warning)

    def test_a_whole_reply_of_three_choices_shows_the_first(self, cli, server):
        body = completion("zero")
        body["choices"] += [
            {
                "index": index,
                "message": {"role": "assistant", "content": text},
                "finish_reason": reason,
            }
            for index, text, reason in ((1, "one", "stop"), (2, "two", "length"))
        ]
        server.reply(json_response(body))
        done = cli("--base-url", server.url, "-o", "n", "3", "hi")
        assert (done.code, done.out, done.err) == (0, "zero\n", N_WARNING)
        assert only_turn()["assistant"] == "zero"


TOOLS = json.dumps(
    [
        {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
        for name in ("get_weather", "get_time")
    ]
)
WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
# arguments that are not JSON stay a string
TIME = '{"name": "get_time", "arguments": "Europe/Paris"}\n'


def call_piece(index: int, arguments: str, name: str | None = None) -> dict:
    """A streamed tool_calls item: the first of a call carries its id, type and name."""
    if name is None:
        return {"index": index, "function": {"arguments": arguments}}
    return {
        "index": index,
        "id": f"call_{index}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def whole_call(number: int, name: str, arguments) -> dict:
    """A whole tool call without an index, as a whole reply carries it (and some servers stream
    it)."""
    return {
        "id": f"call_{number}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


class TestToolCalls:
    def test_streamed_calls_are_assembled_by_index_after_the_text(self, cli, server):
        server.reply(
            sse_response(
                chunk("", role="assistant"),
                chunk("Let me check "),
                chunk("both."),
                chunk(tool_calls=[call_piece(0, "", "get_weather")]),
                chunk(tool_calls=[call_piece(1, "", "get_time")]),
                chunk(tool_calls=[call_piece(0, '{"city": ')]),
                chunk(tool_calls=[call_piece(1, "Europe/")]),
                chunk(tool_calls=[call_piece(0, '"Paris"}')]),
                chunk(tool_calls=[call_piece(1, "Paris")]),
                chunk(finish_reason="tool_calls"),
                DONE,
            )
        )
        done = cli("--base-url", server.url, "--stream", "-o", "tools", TOOLS, "hi")
        assert (done.code, done.out, done.err) == (0, "Let me check both.\n" + WEATHER + TIME, "")
        assert server.bodies[0]["tools"] == json.loads(TOOLS)
        assert only_turn()["assistant"] == done.out

    @pytest.mark.parametrize(
        "content, arguments, out",
        [
            (None, '{"city": "Paris"}', WEATHER + TIME),
            # a provider that sends the arguments parsed
            ("Checking.\n", {"city": "Paris"}, "Checking.\n" + WEATHER + TIME),
            ("", '{"city": "Paris"}', WEATHER + TIME),
        ],
        ids=["content null", "text first, arguments an object", "content empty"],
    )
    def test_a_whole_reply_with_calls(self, cli, server, content, arguments, out):
        calls = [whole_call(0, "get_weather", arguments), whole_call(1, "get_time", "Europe/Paris")]
        server.reply(json_response(completion(content, "tool_calls", tool_calls=calls)))
        done = cli("--base-url", server.url, "-o", "tools", TOOLS, "hi")
        assert (done.code, done.out, done.err) == (0, out, "")
        assert only_turn()["assistant"] == out

    def test_streamed_whole_calls_without_an_index_stay_apart(self, cli, server):
        # Ollama (ollama/ollama#7881) and Gemini's compatible API (openai/openai-python#2806)
        # send each call whole in one delta, with an id but no index.
        server.reply(
            sse_response(
                chunk(tool_calls=[whole_call(0, "get_weather", '{"city": "Paris"}')]),
                chunk(tool_calls=[whole_call(1, "get_time", "Europe/Paris")]),
                chunk(finish_reason="tool_calls"),
                DONE,
            )
        )
        done = cli("--base-url", server.url, "--stream", "-o", "tools", TOOLS, "hi")
        assert (done.code, done.out, done.err) == (0, WEATHER + TIME, "")

    def test_arguments_in_many_pieces_are_assembled_whole(self):
        # (Assembling them is linear: the pieces are joined once, at the end; the benchmark's
        # long-arguments row shows the time.)
        calls = {}
        chat.add_tool_calls(calls, [call_piece(0, "", "write_file")])
        for _ in range(2_000):
            chat.add_tool_calls(calls, [call_piece(0, "x" * 1000)])
        assert chat.tool_call_lines(calls) == (
            '{"name": "write_file", "arguments": "' + "x" * 2_000_000 + '"}\n'
        )


# ------------------------------------------------------------------ v3: bounded work


class TestBoundedWork:
    def test_an_event_line_over_64_mib_is_exit_1(self, cli, server):
        def endless_line(conn, request):
            piece = chunk_of(b"x" * MIB)
            conn.sendall(SSE_HEAD + chunk_of(chunk("before ") + b"data: "))
            for _ in range(66):
                conn.sendall(piece)
            conn.sendall(chunk_of(b"\n\n") + END_CHUNKS)

        server.reply(endless_line)
        done = cli("--base-url", server.url, "--stream", "hi")
        assert (done.code, done.out, done.err) == (
            1,
            "before \n",
            "error: an event in the stream is larger than 64 MiB\n",
        )

    def test_a_stream_whose_text_passes_64_mib_is_exit_1(self, cli, server):
        # Two events of 32 MiB of text, the second one character longer: 64 MiB + 1 in all.
        def past_the_limit(conn, request):
            conn.sendall(SSE_HEAD)
            for text in b"a" * (32 * MIB), b"b" * (32 * MIB + 1):
                event = b'data: {"choices": [{"index": 0, "delta": {"content": "%s"}}]}\n\n' % text
                for piece in (
                    f"{len(event):x}\r\n".encode(),
                    event,
                    b"\r\n",
                ):  # one chunk, not copied again
                    conn.sendall(piece)
            conn.recv(1)  # until chat.py hangs up; then the rest of the stream has nowhere to go
            conn.sendall(chunk_of(chunk("never shown") + DONE) + END_CHUNKS)

        server.reply(past_the_limit)
        stdout = CountingStdout()
        done = run_with_stdout(cli, stdout, "--base-url", server.url, "--stream", "hi")
        assert (done.code, done.err) == (
            1,
            "error: the streamed reply passed 64 MiB; chat.py stopped there\n",
        )
        # What arrived before the limit stays on screen, and the error starts on a line of its own.
        assert (stdout.size, stdout.tail) == (64 * MIB + 2, "bbbb\n")
        assert saved() == {}

    @pytest.mark.parametrize("keep_alive", [PING, b"data: \n\n"], ids=["comments", "blank data"])
    def test_keep_alives_alone_for_the_timeout_are_exit_4(self, cli, server, keep_alive):
        stop, ran_out = threading.Event(), threading.Event()

        def keep_alives_only(conn, request):
            conn.sendall(SSE_HEAD)
            for _ in range(300):  # 30 s
                conn.sendall(chunk_of(keep_alive))
                if stop.wait(0.1):
                    return
            ran_out.set()

        server.reply(keep_alives_only)
        try:
            done = cli("--base-url", server.url, "--stream", "--timeout", "0.5", "hi")
            server_still_sending = not ran_out.is_set()
        finally:
            stop.set()
        host = server.url.split("/")[2]
        assert (done.code, done.out, done.err) == (
            4,
            "",
            f"error: {host} sent no data for 0.5 s, only keep-alives (--timeout)\n",
        )
        assert server_still_sending

    def test_keep_alives_between_data_events_within_the_timeout_are_fine(self, cli, server):
        # Each gap between data events is 0.2 s; the whole stream takes longer than --timeout.
        def slow_with_keep_alives(conn, request):
            conn.sendall(SSE_HEAD + chunk_of(chunk("one ")))
            for text in ("two ", "three"):
                for _ in range(4):
                    time.sleep(0.05)
                    conn.sendall(chunk_of(PING))
                conn.sendall(chunk_of(chunk(text)))
            for _ in range(4):
                time.sleep(0.05)
                conn.sendall(chunk_of(PING))
            conn.sendall(chunk_of(chunk(finish_reason="stop") + DONE) + END_CHUNKS)

        server.reply(slow_with_keep_alives)
        started = time.monotonic()
        done = cli("--base-url", server.url, "--stream", "--timeout", "0.5", "hi")
        assert (done.code, done.out, done.err) == (0, "one two three\n", "")
        assert time.monotonic() - started > 0.5


class CountingStdout(io.StringIO):
    """A stdout that keeps only how many characters came and the last few."""

    def __init__(self):
        super().__init__()
        self.size, self.tail = 0, ""

    def write(self, text: str) -> int:
        self.size += len(text)
        self.tail = (self.tail + text[-5:])[-5:]
        return len(text)


# ------------------------------------------------------------------ v3: untrusted content

CONTROL_DELTAS = (
    "bell\x07 esc\x1b[31mred",
    " crlf\r\n",
    "cr at the end\r",
    "\nnext line\ttab",
    " lone\rcr",
    " del\x7f c1\x9b",
    " nul\x00 end\r",
)
EXACT = "".join(CONTROL_DELTAS)


@pytest.mark.parametrize(
    "stdout_tty, out",
    [
        (False, EXACT + "\n"),
        # "\r" at the end of one delta and "\n" at the start of the next make a newline, not \x0d.
        (
            True,
            (
                "bell\\x07 esc\\x1b[31mred crlf\r\ncr at the end\r\nnext line\ttab lone\\x0dcr "
                "del\\x7f c1\\x9b"
                " nul\\x00 end\\x0d\n"
            ),
        ),
    ],
    ids=["pipe", "terminal"],
)
def test_control_characters_reach_a_pipe_exactly_and_a_terminal_made_visible(
    cli, server, stdout_tty, out
):
    server.reply(sse_response(stream_events(*CONTROL_DELTAS)))
    done = cli("--base-url", server.url, "--stream", "hi", ttys=(False, stdout_tty, False))
    assert (done.code, done.out, done.err) == (0, out, "")
    assert only_turn()["assistant"] == EXACT


# ------------------------------------------------------------------ v4: every reply told right

THINKING_PARTS = [{"type": "thinking", "thinking": [{"type": "text", "text": "Hm, "}]}]
# Each shape a model's reasoning "Hm, ok." comes in, as two deltas (or one message) ahead of
# the answer "Yes.".
REASONING_SHAPES = {
    "reasoning_content": [{"reasoning_content": "Hm, "}, {"reasoning_content": "ok."}],
    "reasoning": [{"reasoning": "Hm, "}, {"reasoning": "ok."}],
    "thinking parts": [
        {"content": THINKING_PARTS},
        {"content": [{"type": "thinking", "thinking": [{"type": "text", "text": "ok."}]}]},
    ],
    "reasoning_details": [
        {"reasoning_details": [{"type": "reasoning.text", "text": "Hm, ", "signature": "s"}]},
        {
            "reasoning_details": [
                {"type": "reasoning.encrypted", "data": "b3BhcXVl"},
                {"type": "reasoning.summary", "summary": "ok."},
            ]
        },
    ],
    "reasoning and the same in reasoning_details": [
        {"reasoning": "Hm, ", "reasoning_details": [{"type": "reasoning.text", "text": "Hm, "}]},
        {"reasoning": "ok.", "reasoning_details": [{"type": "reasoning.text", "text": "ok."}]},
    ],
    "think block": [{"content": "<think>Hm, "}, {"content": "ok.</think>"}],
}


def whole_message(deltas: list[dict]) -> dict:
    """The deltas of a shape joined into one message, as a whole reply carries it."""
    message: dict = {"role": "assistant"}
    for delta in deltas + [{"content": "Yes."}]:
        for key, value in delta.items():
            if isinstance(value, str) and isinstance(message.get(key, ""), str):
                message[key] = message.get(key, "") + value
            else:
                before = message.get(key, [])
                before = [{"type": "text", "text": before}] if isinstance(before, str) else before
                value = [{"type": "text", "text": value}] if isinstance(value, str) else value
                message[key] = before + value
    return message


class TestReasoningInEveryShape:
    @pytest.mark.parametrize("shape", REASONING_SHAPES)
    @pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "whole"])
    def test_reasoning_goes_to_stderr_and_the_answer_to_stdout_and_the_file(
        self, cli, server, shape, streamed
    ):
        deltas = REASONING_SHAPES[shape]
        if streamed:
            events = [raw_event({"index": 0, "delta": delta}) for delta in deltas]
            server.reply(sse_response(*events, chunk("Yes."), chunk(finish_reason="stop"), DONE))
        else:
            reply = completion(None)
            reply["choices"][0]["message"] = whole_message(deltas)
            server.reply(json_response(reply))
        done = cli("--base-url", server.url, "--reasoning", "show", "q")
        assert (done.code, done.out, done.err) == (0, "Yes.\n", "reasoning:\nHm, ok.\n\n")
        assert only_turn()["assistant"] == "Yes."
        assert "Hm" not in json.dumps(saved())

    def test_parts_of_other_or_odd_types_are_skipped(self, cli, server):
        odd = [{"type": ["text"], "text": "x"}, {"type": "image_url"}, "text", None, {"text": "A"}]
        server.reply(json_response(completion(odd + [{"type": "text", "text": "B"}])))
        done = cli("--base-url", server.url, "q")
        assert (done.code, done.out, done.err) == (0, "AB\n", "")

    def test_hidden_unless_asked_for(self, cli, server):
        server.reply(sse_response(chunk(content=THINKING_PARTS), chunk("Yes.", "stop"), DONE))
        done = cli("--base-url", server.url, "--stream", "q")
        assert (done.code, done.out, done.err) == (0, "Yes.\n", "")

    def test_text_parts_and_strings_join_in_order(self, cli, server):
        # mistral-small: "1" as the text part after its last thinking part, then "44" as a string
        parts = THINKING_PARTS + [{"type": "text", "text": "1"}]
        server.reply(sse_response(chunk(content=parts), chunk("44", "stop"), DONE))
        done = cli("--base-url", server.url, "--stream", "q")
        assert (done.code, done.out, done.err) == (0, "144\n", "")

    @pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "whole"])
    def test_a_think_block_never_closed_is_reasoning_then_a_warning(self, cli, server, streamed):
        if streamed:
            server.reply(sse_response(stream_events("<think>still ", "thinking")))
        else:
            server.reply(json_response(completion("<think>still thinking")))
        done = cli("--base-url", server.url, "--reasoning", "show", "q")
        assert (done.code, done.out) == (0, "\n")
        assert done.err == (
            "reasoning:\nstill thinking\n\nwarning: the reply was only reasoning, no answer\n"
        )


THINK_REPLY = "\n<think>\nLet me see: 日本.\n</think>\n\nThe answer: <think> is text here."


class TestThinkBlockCutAnywhere:
    @pytest.mark.parametrize("cut", range(1, len(THINK_REPLY)))
    def test_cut_in_two_at_any_character(self, cli, server, cut):
        server.reply(sse_response(stream_events(THINK_REPLY[:cut], THINK_REPLY[cut:])))
        done = cli("--base-url", server.url, "--stream", "--reasoning", "show", "q")
        assert (done.code, done.out, done.err) == (
            0,
            "The answer: <think> is text here.\n",
            "reasoning:\n\nLet me see: 日本.\n\n",
        )

    def test_one_character_a_delta(self, cli, server):
        server.reply(sse_response(stream_events(*THINK_REPLY)))
        done = cli("--base-url", server.url, "--stream", "--reasoning", "show", "q")
        assert (done.code, done.out) == (0, "The answer: <think> is text here.\n")
        assert done.err == "reasoning:\n\nLet me see: 日本.\n\n"

    @pytest.mark.parametrize("cut", range(len(THINK_REPLY.encode()) + 1))
    def test_the_splitter_alone_at_every_byte_boundary_of_its_events(self, cut):
        # Bytes cut anywhere in the stream reach the splitter as whole characters.
        think, decoder, reply, pieces = chat.ThinkBlock(), chat.SSEDecoder(), chat.Reply(), []
        raw = stream_events(THINK_REPLY[:20], THINK_REPLY[20:])
        for part in (raw[:cut], raw[cut:]):
            for event, data in decoder.feed(part):
                if data != "[DONE]":
                    text, _ = chat.read_stream_event(event, data, reply)
                    pieces.append(think.split(text))
        pieces.append(think.split("", last=True))
        assert "".join(text for text, _ in pieces) == "The answer: <think> is text here."
        assert "".join(thought for _, thought in pieces) == "\nLet me see: 日本.\n"


class TestStreamEnds:
    def test_cut_short_before_any_text_is_retried(self, cli, server):
        server.reply(sse_response(chunk("", role="assistant")), sse_response(stream_events("ok")))
        done = cli("--base-url", server.url, "--stream", "q")
        assert (done.code, done.out, len(server.requests)) == (0, "ok\n", 2)
        assert done.err == (
            "warning: the connection closed before the reply was complete; "
            f"retrying in {cli.waits[0]:.1f} s (2 of 3)\n"
        )

    def test_finish_reason_for_another_choice_is_not_the_end(self, cli, server):
        server.reply(
            sse_response(chunk("half", index=0), chunk("other", "stop", index=1)), chunk_of(b"")
        )
        done = cli("--base-url", server.url, "--stream", "--retries", "0", "q")
        assert (done.code, done.out) == (3, "half\n")
        assert done.err.endswith("error: the connection closed before the reply was complete\n")
        assert saved() == {}

    @pytest.mark.parametrize(
        "line, message",
        [
            (
                b'error: {"error": {"message": "failed to decode", "type": "server_error"}}\n\n',
                "failed to decode",
            ),
            (b"error: upstream gone\n", "upstream gone"),
        ],
        ids=["JSON", "text"],
    )
    def test_an_error_line_outside_the_fields_ends_the_reply(self, cli, server, line, message):
        server.reply(sse_response(chunk("so far"), line))
        done = cli("--base-url", server.url, "--stream", "q")
        assert (done.code, done.out) == (1, "so far\n")
        assert done.err == f"error: the server reported an error mid-stream: {message}\n"
        assert saved() == {}

    def test_other_unknown_lines_change_nothing(self, cli, server):
        server.reply(sse_response(b"warning: x\nerrors: y\n\n", stream_events("ok")))
        done = cli("--base-url", server.url, "--stream", "q")
        assert (done.code, done.out, done.err) == (0, "ok\n", "")

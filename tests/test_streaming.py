"""Server-Sent Events: the decoder on its own, then --stream end to end over raw sockets."""

import os
import select
import subprocess
import sys
import threading
import time

import pytest

import chat
from conftest import (CHAT, END_CHUNKS, SSE_HEAD, child_env, chunk_event, chunked, completion,
                      json_response, stream_events)


def decode(*chunks: bytes) -> list[tuple[str, str]]:
    decoder = chat.SSEDecoder()
    events = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    return events


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

    def test_multibyte_character_split_across_reads(self):
        data = "data: {\"c\": \"日本語 ☕\"}\n\n".encode()
        for cut in range(1, len(data)):
            assert decode(data[:cut], data[cut:]) == [("", '{"c": "日本語 ☕"}')]

    def test_byte_at_a_time(self):
        data = stream_events("Hel", "lo")
        events = decode(*(data[i:i + 1] for i in range(len(data))))
        assert events[-1] == ("", "[DONE]") and len(events) == 5


def sse_server(raw_server, *pieces, hold: threading.Event | None = None, head=SSE_HEAD):
    """A server that answers with chunked pieces (bytes, or seconds to sleep), then ends
    the body, or holds the connection open until `hold` is set."""

    def handler(conn, request):
        conn.sendall(head)
        for piece in pieces:
            if isinstance(piece, (int, float)):
                time.sleep(piece)
            elif isinstance(piece, threading.Event):
                piece.wait(10)
            else:
                conn.sendall(chunked(piece) if b"chunked" in head else piece)
        if hold is not None:
            hold.wait(30)
            return
        if b"chunked" in head:
            conn.sendall(END_CHUNKS)

    return raw_server(handler)


def read_in_two_parts(url, tmp_path, first_part: bytes, release: threading.Event):
    """Run chat.py --stream; read first_part from its stdout while the server still holds back
    the rest, then let the server go on. Returns (first read, rest, stderr, exit code)."""
    process = subprocess.Popen(
        [sys.executable, str(CHAT), "--base-url", url, "--stream", "hi"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
        env=child_env(),
    )
    try:
        first, deadline = b"", time.monotonic() + 5
        while len(first) < len(first_part) and time.monotonic() < deadline:
            if select.select([process.stdout], [], [], 0.1)[0]:
                first += os.read(process.stdout.fileno(), 1024)
        release.set()
        rest, err = process.communicate(timeout=20)
    finally:
        release.set()
        process.kill()
    return first, rest, err, process.returncode


class TestStreamingCli:
    def test_deltas_are_printed_and_the_body_asks_to_stream(self, run_chat, raw_server):
        url, received = sse_server(raw_server, stream_events("Hel", "lo, ", "wörld"))
        done = run_chat("--base-url", url, "--stream", "hi")
        assert (done.code, done.out, done.err) == (0, "Hello, wörld\n", "")
        assert received[0]["body"]["stream"] is True

    @pytest.mark.parametrize("deltas, out", [(("line one\n", "line two\n"), "line one\nline two\n"),
                                             (("ends", "\n"), "ends\n"), ((), "\n"),
                                             (("no end",), "no end\n")])
    def test_a_reply_ending_with_a_newline_gets_no_second_one(self, run_chat, raw_server, deltas, out):
        url, _ = sse_server(raw_server, stream_events(*deltas))
        done = run_chat("--base-url", url, "--stream", "hi")
        assert (done.code, done.out, done.err) == (0, out, "")

    def test_each_delta_is_flushed_the_moment_it_arrives(self, raw_server, tmp_path):
        release = threading.Event()
        url, _ = sse_server(raw_server, chunk_event("first "), release,
                            chunk_event("second") + b"data: [DONE]\n\n")
        assert read_in_two_parts(url, tmp_path, b"first ", release) == (b"first ", b"second\n", b"", 0)

    @pytest.mark.parametrize(
        "name, raw",
        [
            ("no space after the colon", b'data:{"choices":[{"delta":{"content":"ok"}}]}\n\n'),
            ("CRLF line ends", b'data: {"choices":[{"delta":{"content":"ok"}}]}\r\n\r\n'),
            ("CR line ends", b'data: {"choices":[{"delta":{"content":"ok"}}]}\r\r'),
            ("comments and other fields",
             b': ping\n\nid: 1\nretry: 10\nevent: message\ndata: {"choices":[{"delta":'
             b'{"content":"ok"}}]}\n\n: bye\n\n'),
            ("data split over two lines",
             b'data: {"choices":[{"delta":\ndata: {"content":"ok"}}]}\n\n'),
            ("chunks without choices or with null content",
             b'data: {"choices":[]}\n\ndata: {"choices":[{"delta":{"content":null}}]}\n\n'
             b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n'
             b'data: {"choices":[{"delta":{"content":"ok"}}]}\n\n'
             b'data: {"choices":[],"usage":{"total_tokens":3}}\n\n'),
        ],
    )
    def test_spec_variants(self, run_chat, raw_server, name, raw):
        url, _ = sse_server(raw_server, raw, chunk_event(finish_reason="stop"), b"data: [DONE]\n\n")
        done = run_chat("--base-url", url, "--stream", "hi")
        assert (done.code, done.out, done.err) == (0, "ok\n", ""), name
        assert "None" not in done.out

    def test_done_ends_the_stream_even_if_the_connection_stays_open(self, run_chat, raw_server):
        hold = threading.Event()
        try:
            url, _ = sse_server(raw_server, stream_events("quick"), hold=hold)
            done = run_chat("--base-url", url, "--stream", "--timeout", "30", "hi", timeout=10)
        finally:
            hold.set()
        assert (done.code, done.out, done.err) == (0, "quick\n", "")

    def test_nothing_after_done_is_shown(self, run_chat, raw_server):
        url, _ = sse_server(raw_server, chunk_event("shown") + b"data: [DONE]\n\n" + chunk_event("hidden"))
        done = run_chat("--base-url", url, "--stream", "hi")
        assert (done.code, done.out, done.err) == (0, "shown\n", "")

    def test_utf8_without_charset_split_inside_characters(self, run_chat, raw_server):
        event = chunk_event("日本語 café ☕ \u2028 end", ascii_only=False)
        assert "日本語".encode() in event  # raw UTF-8 on the wire, not \\u escapes
        pieces = [event[i:i + 3] for i in range(0, len(event), 3)]
        url, _ = sse_server(raw_server, *pieces, b"data: [DONE]\n\n")
        done = run_chat("--base-url", url, "--stream", "hi", env={"PYTHONIOENCODING": "utf-8"})
        assert done.code == 0
        assert done.raw_out == "日本語 café ☕ \u2028 end\n".encode()

    def test_error_event_mid_stream_keeps_the_partial_text(self, run_chat, raw_server):
        error = b'data: {"error": {"message": "upstream overloaded", "type": "server_error"}}\n\n'
        url, _ = sse_server(raw_server, chunk_event("partial "), chunk_event("text"), error)
        done = run_chat("--base-url", url, "--stream", "hi")
        assert done.code == 1
        assert done.out == "partial text\n"
        assert done.err == "error: the server reported an error mid-stream: upstream overloaded\n"

    def test_named_error_event(self, run_chat, raw_server):
        url, _ = sse_server(raw_server, b'event: error\ndata: {"message": "quota"}\n\n')
        done = run_chat("--base-url", url, "--stream", "hi")
        assert (done.code, done.out) == (1, "")
        assert done.err == "error: the server reported an error mid-stream: quota\n"

    def test_malformed_event_is_an_api_error(self, run_chat, raw_server):
        url, _ = sse_server(raw_server, chunk_event("ok "), b"data: {not json\n\n")
        done = run_chat("--base-url", url, "--stream", "hi")
        assert (done.code, done.out) == (1, "ok \n")
        assert done.err.startswith("error: malformed event in the stream")

    def test_end_without_done_prints_what_came(self, run_chat, raw_server):
        url, _ = sse_server(raw_server, chunk_event("all "), chunk_event("there", "stop"))
        done = run_chat("--base-url", url, "--stream", "hi")
        assert (done.code, done.out, done.err) == (0, "all there\n", "")

    def test_end_without_done_or_finish_reason_warns(self, run_chat, raw_server):
        url, _ = sse_server(raw_server, chunk_event("half"))
        done = run_chat("--base-url", url, "--stream", "hi")
        assert (done.code, done.out) == (0, "half\n")
        assert done.err == "warning: the stream ended before the reply was complete\n"

    def test_finish_reason_length_warns(self, run_chat, raw_server):
        url, _ = sse_server(raw_server, chunk_event("cut"), chunk_event(finish_reason="length"),
                            b"data: [DONE]\n\n")
        done = run_chat("--base-url", url, "--stream", "hi")
        assert (done.code, done.out) == (0, "cut\n")
        assert "token limit" in done.err

    def test_refusal_delta_is_shown(self, run_chat, raw_server):
        refusal = b'data: {"choices":[{"delta":{"content":null,"refusal":"No."}}]}\n\n'
        url, _ = sse_server(raw_server, refusal, chunk_event(finish_reason="stop"))
        done = run_chat("--base-url", url, "--stream", "hi")
        assert (done.code, done.out) == (0, "No.\n")

    def test_stream_without_chunked_encoding_arrives_incrementally(self, raw_server, tmp_path):
        # An HTTP/1.0-style body delimited by closing the connection.
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
        release = threading.Event()
        url, _ = sse_server(raw_server, chunk_event("early "), release, stream_events("late"),
                            head=head)
        assert read_in_two_parts(url, tmp_path, b"early ", release) == (b"early ", b"late\n", b"", 0)

    def test_a_json_answer_to_a_streaming_request(self, run_chat, raw_server):
        answer = json_response(200, completion("whole"))
        url, received = raw_server(lambda conn, request: conn.sendall(answer))
        done = run_chat("--base-url", url, "--stream", "hi")
        assert (done.code, done.out, done.err) == (0, "whole\n", "")
        assert received[0]["body"]["stream"] is True

    def test_a_stream_answering_a_plain_request(self, run_chat, raw_server):
        url, received = sse_server(raw_server, stream_events("streamed ", "anyway"))
        done = run_chat("--base-url", url, "hi")
        assert (done.code, done.out, done.err) == (0, "streamed anyway\n", "")
        assert "stream" not in received[0]["body"]

    def test_an_unfinished_last_event_is_not_shown(self, run_chat, raw_server):
        # The spec discards an event the stream cut off before its blank line.
        url, _ = sse_server(raw_server, chunk_event("kept", "stop"),
                            b'data: {"choices":[{"delta":{"content":"lost"}}]}')
        done = run_chat("--base-url", url, "--stream", "hi")
        assert (done.code, done.out) == (0, "kept\n")

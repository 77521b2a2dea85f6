"""Property tests: however a valid stream is cut into network reads, the events, the printed
text and the reasoning (choice 0's only) are the same; garbage never crashes the reader.
Examples are capped so the file takes about two seconds."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

import chat

# Text a model might send: any Unicode but surrogates, including U+2028, CR and LF.
delta_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)
line_end = st.sampled_from([b"\n", b"\r\n", b"\r"])
# A line of any bytes that is not a data/event field: a comment, or an unknown or ignored field.
garbage_line = st.one_of(
    st.binary(max_size=40).map(lambda raw: b":" + raw),
    st.sampled_from([b"id", b"retry", b"foo", b"x-custom", b"datum"]).flatmap(
        lambda name: st.binary(max_size=20).map(lambda raw: name + b": " + raw)
    ),
).map(lambda line: line.replace(b"\r", b"").replace(b"\n", b""))


@st.composite
def sse_streams(draw):
    """(stream bytes, expected events, expected printed text, expected reasoning)"""
    texts = draw(st.lists(delta_text, max_size=12))
    thoughts = draw(st.lists(delta_text, min_size=len(texts), max_size=len(texts)))
    raw, events = b"", []
    for text, thought in zip(texts, thoughts, strict=True):
        end = draw(line_end)
        for line in draw(st.lists(garbage_line, max_size=2)):
            raw += line + end
        delta = {
            "content": text,
            draw(st.sampled_from(["reasoning_content", "reasoning"])): thought,
        }
        # Indented JSON has line breaks only between tokens: sent as several data: lines,
        # which the decoder joins with "\n".
        payload = json.dumps(
            {"choices": [{"delta": delta}]},
            ensure_ascii=draw(st.booleans()),
            indent=1 if draw(st.booleans()) else None,
        )
        lines = []
        for piece in payload.split("\n"):
            value = draw(st.sampled_from(["", " "])) + piece
            raw += b"data:" + value.encode() + end
            lines.append(value.removeprefix(" "))  # the decoder drops one space after the colon
        raw += end
        events.append(("", "\n".join(lines)))
        if draw(st.booleans()):  # another choice's delta (-o n): never part of what is shown
            other = json.dumps(
                {"choices": [{"index": draw(st.integers(1, 3)), "delta": {"content": text}}]}
            )
            raw += b"data: " + other.encode() + end + end
            events.append(("", other))
    raw += b"data: [DONE]" + draw(line_end) * 2
    events.append(("", "[DONE]"))
    return raw, events, "".join(texts), "".join(thoughts)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    return [data[start:end] for start, end in zip([0] + points, points + [len(data)], strict=True)]


def decode_all(chunks) -> list[tuple[str, str]]:
    decoder = chat.SSEDecoder()
    events = [event for chunk in chunks for event in decoder.feed(chunk)]
    return events


def read_all(events) -> tuple[str, str]:
    """The text and the reasoning the events add up to."""
    reply = chat.Reply()
    pieces = [
        chat.read_stream_event(event, data, reply) for event, data in events if data != "[DONE]"
    ]
    return "".join(text for text, _ in pieces), "".join(thought for _, thought in pieces)


@settings(max_examples=200, deadline=None)
@given(sse_streams(), st.lists(st.integers(min_value=0), max_size=25))
def test_any_split_gives_the_same_events_and_text(stream, cuts):
    raw, expected_events, expected_text, expected_reasoning = stream
    events = decode_all(split_at(raw, cuts))
    assert events == expected_events
    assert read_all(events) == (expected_text, expected_reasoning)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.lists(st.integers(min_value=0), max_size=10))
def test_arbitrary_bytes_never_crash_the_reader(raw, cuts):
    events = decode_all(split_at(raw, cuts))
    assert events == decode_all([raw])
    for event, data in events:
        try:
            chat.read_stream_event(event, data, chat.Reply())
        except chat.ApiError:
            pass  # a clean, explained failure is allowed; any other exception is not


@settings(max_examples=100, deadline=None)
@given(st.lists(garbage_line, max_size=8), line_end, st.lists(st.integers(min_value=0), max_size=8))
def test_garbage_lines_between_events_change_nothing(garbage, end, cuts):
    good = b"data: " + json.dumps({"choices": [{"delta": {"content": "ok"}}]}).encode() + end + end
    raw = b"".join(line + end for line in garbage) + good + b"".join(line + end for line in garbage)
    events = decode_all(split_at(raw, cuts))
    assert read_all(events) == ("ok", "")


def test_the_one_event_per_read_shortcut_keeps_what_earlier_reads_set():
    """A whole `data:` event in one read takes a shortcut; an `event:` line, a BOM or a data
    line from an earlier read must count as they do on the long way."""
    decoder = chat.SSEDecoder()
    assert decoder.feed(b"\xef\xbb\xbfdata: a\n\n") == [("", "a")]  # the first read: no shortcut
    assert decoder.feed(b"event: error\n") == []
    assert decoder.feed(b"data: b\n\n") == [("error", "b")]
    assert decoder.feed(b"data: c\n\n") == [("", "c")]  # the event name went with b
    assert decoder.feed(b"data: d\n") == []
    assert decoder.feed(b"data: e\n\n") == [("", "d\ne")]
    assert decoder.feed(b"data:f\n\n") == [("", "f")]  # no space after the colon
    assert decoder.feed(b"data:  f\n\n") == [("", " f")]  # one space goes, not two
    # A CR or an LF inside is a line break, so these reads are more than one data line.
    assert decoder.feed(b"data: g\r\rdata: h\n\n") == [("", "g"), ("", "h")]
    assert decoder.feed(b"data: i\ndata: j\n\n") == [("", "i\nj")]
    assert decoder.feed(b"data: k\r\n\n") == [("", "k")]
    traced = []
    decoder = chat.SSEDecoder(traced.append)
    decoder.started = True
    assert decoder.feed(b"data: l\n\n") == [("", "l")] and traced == ["data: l", ""]

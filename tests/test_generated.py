"""Generated inputs through main(), against the fake server: whole replies, streams, saved
conversation files and command lines. Whatever comes, chat.py ends with a documented exit code
and short lines, never "a bug in chat.py": the in-process runner re-raises a bug, so any
exception fails the test with its traceback. And generated base URLs: one chat.py takes is read
by requests as chat.py reads it.

A few hundred examples per surface by default; CHAT_PY_HYPOTHESIS_EXAMPLES=10000 (say) for a
longer run."""

import itertools
import json
import os
from urllib.parse import urlsplit

import requests
import urllib3
from conftest import FAKE_KEY, SSE_HEAD, chunk_of, http_response
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import chat

EXAMPLES = int(os.environ.get("CHAT_PY_HYPOTHESIS_EXAMPLES") or 250)
generated = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # one server and folder, every example its own state
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
runs = itertools.count()

# Text as servers and people send it: any code point, lone surrogates, controls, markup.
odd_text = st.lists(
    st.one_of(
        st.characters(),
        st.characters(categories=["Cs"]),
        st.sampled_from(list('\n\r\t\x1b\x00\u202e\u2028<>{}[]"\\/:')),
    ),
    max_size=30,
).map("".join) | st.sampled_from(["<think>", "</think>", "<think>why</think>ok", "data: [DONE]"])
numbers = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1e308, 1e400, 9.3e9]),
)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | odd_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(odd_text, inner, max_size=4),
    max_leaves=12,
)


def maybe(strategy):
    """A field mostly of the right shape, else of any JSON shape, or absent (None: left out)."""
    return st.one_of(strategy, strategy, strategy, json_values, st.just(None))


parts = st.lists(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "thinking", "image_url", "output_text", "x"])},
        optional={"text": maybe(odd_text), "thinking": maybe(st.lists(json_values, max_size=2))},
    ),
    max_size=3,
)
message_fields = {
    "content": maybe(odd_text | parts),
    "reasoning_content": maybe(odd_text),
    "reasoning": maybe(odd_text),
    "reasoning_details": maybe(
        st.lists(st.fixed_dictionaries({"type": odd_text, "text": odd_text}))
    ),
    "refusal": maybe(odd_text),
    "tool_calls": maybe(
        st.lists(
            st.fixed_dictionaries(
                {"index": maybe(numbers), "id": maybe(odd_text)},
                optional={
                    "function": st.fixed_dictionaries(
                        {"name": maybe(odd_text), "arguments": maybe(odd_text)}
                    )
                },
            ),
            max_size=3,
        )
    ),
}


def without_nones(mapping: dict) -> dict:
    return {key: value for key, value in mapping.items() if value is not None}


choice = st.fixed_dictionaries(
    {
        "index": maybe(st.integers(0, 2)),
        "finish_reason": maybe(st.sampled_from(["stop", "length", "tool_calls", "content_filter"])),
        "message": maybe(st.fixed_dictionaries(message_fields).map(without_nones)),
        "delta": maybe(st.fixed_dictionaries(message_fields).map(without_nones)),
    }
).map(without_nones)
reply_bodies = st.fixed_dictionaries(
    {
        "choices": maybe(st.lists(choice, max_size=2)),
        "model": maybe(odd_text),
        "usage": maybe(st.dictionaries(odd_text, numbers, max_size=3)),
        "error": st.one_of(st.none(), st.none(), st.none(), json_values),
        "detail": st.one_of(st.none(), st.none(), st.none(), json_values),
    }
).map(without_nones)
# And replies of the usual shape, with any text, parts and reasoning in them.
usual_message = st.fixed_dictionaries(
    {"role": st.just("assistant"), "content": odd_text | parts},
    optional={"reasoning_content": odd_text, "reasoning": odd_text},
)
usual_replies = st.tuples(usual_message, st.sampled_from(["message", "delta"])).map(
    lambda pair: {"model": "m", "choices": [{"index": 0, pair[1]: pair[0], "finish_reason": None}]}
)
headers = st.lists(
    st.tuples(
        st.sampled_from(["Retry-After", "retry-after-ms", "x-should-retry", "Content-Encoding"]),
        st.sampled_from(["1e308", "-1", "nan", "true", "gzip", "Wed, 21 Oct 2015 07:28:00 GMT"])
        | st.text("0123456789.e-", max_size=6),
    ),
    max_size=2,
).map(lambda pairs: "".join(f"{name}: {value}\r\n" for name, value in pairs))
flags = st.lists(
    st.sampled_from(
        [
            ["--reasoning", "show"],
            ["-v"],
            ["-u"],
            ["--schema", "name, age int"],
            ["--schema", '{"required": [["a"], "b"]}'],
            ["-o", "n", "2"],
            ["--no-save"],
        ]
    ),
    max_size=3,
).map(lambda chosen: [arg for flag in chosen for arg in flag])


def check(done, *extra_secrets: str) -> None:
    """What every run owes its user, whatever it was given (an exit 70 has raised already)."""
    assert done.code in (0, 1, 2, 3, 4), done.err
    for line in done.err.splitlines():
        if line.startswith(("error:", "warning:")):
            assert len(line) <= 600, line  # the message cut to 300, hints whole
    assert FAKE_KEY not in done.out + done.err
    assert "Traceback" not in done.err


def run(cli, tmp_path, *args, **kwargs):
    """One run in a state folder of its own (each example starts with nothing saved)."""
    folder = tmp_path / f"state-{next(runs)}"
    done = cli(*args, env={"CHAT_PY_HOME": str(folder), **kwargs.pop("env", {})}, **kwargs)
    return done, folder


@generated
@given(
    body=(usual_replies | usual_replies | reply_bodies).map(lambda body: json.dumps(body).encode())
    | st.binary(max_size=60)
    | json_values.map(lambda value: json.dumps(value).encode()),
    status=st.sampled_from([200] * 12 + [400, 401, 404, 408, 429, 500, 503]),
    content_type=st.sampled_from(["application/json"] * 8 + ["text/html", "text/plain", ""]),
    extra=headers,
    args=flags,
)
def test_whole_replies(cli, server, tmp_path, body, status, content_type, extra, args):
    server.reply(http_response(status, body, content_type, extra))
    done, _ = run(cli, tmp_path, "--base-url", server.url, "--retries", "0", *args, "q")
    check(done)


def sse_event(value) -> bytes:
    """One stream event: a JSON chunk (as a server writes it), or a line of anything."""
    if isinstance(value, bytes):
        return value
    return b"data: " + json.dumps(value).encode() + b"\n\n"


stream_events = st.lists(
    st.one_of(
        usual_replies,
        usual_replies,
        reply_bodies,
        st.sampled_from(
            [
                b"data: [DONE]\n\n",
                b": ping\n\n",
                b"data:\n\n",
                b"event: error\n",
                b"\n",
                b"data: {\n",
            ]
        ),
        st.binary(max_size=30),
        json_values.map(lambda value: b"error: " + json.dumps(value).encode() + b"\n\n"),
    ),
    max_size=8,
)


@generated
@given(
    events=stream_events,
    ending=st.sampled_from(
        [b"data: [DONE]\n\n", b'data: {"choices": [{"finish_reason": "stop"}]}\n\n', b""]
    ),
    cut=st.booleans(),
    split=st.integers(1, 7),
    args=flags,
)
def test_streams(cli, server, tmp_path, events, ending, cut, split, args):
    data = b"".join(sse_event(event) for event in events) + ending

    def answer(conn, request):
        conn.sendall(SSE_HEAD)
        for start in range(0, len(data), split):  # cut anywhere, even inside a character
            conn.sendall(chunk_of(data[start : start + split]))
        if not cut:  # else the server dies mid-reply
            conn.sendall(b"0\r\n\r\n")

    server.reply(answer)
    done, _ = run(cli, tmp_path, "--base-url", server.url, "--retries", "0", "--stream", *args, "q")
    check(done)


saved_turns = st.fixed_dictionaries(
    {
        "time": maybe(
            st.sampled_from(["2026-01-01T10:00:00Z", "0001-01-01T00:00:00Z", "9999-12-31T23:59Z"])
            | odd_text
        ),
        "model": maybe(odd_text),
        "system": maybe(odd_text),
        "user": maybe(
            st.fixed_dictionaries(
                {"role": maybe(st.just("user")), "content": maybe(odd_text | parts)}
            )
        ),
        "assistant": maybe(odd_text),
        "retry": maybe(st.booleans()),
        "attachments": maybe(st.lists(odd_text, max_size=2)),
    }
).map(without_nones)
saved_lines = st.one_of(
    saved_turns.map(lambda turn: json.dumps(turn).encode()),
    saved_turns.map(lambda turn: json.dumps(turn, ensure_ascii=False).encode("utf-8", "replace")),
    st.binary(max_size=40),
)


@generated
@given(
    lines=st.lists(saved_lines, max_size=5),
    action=st.sampled_from([["--show", "talk"], ["--chats"], ["-c", "q"], ["--chat", "talk", "q"]]),
)
def test_saved_conversations(cli, server, tmp_path, lines, action):
    folder = tmp_path / f"state-{next(runs)}"
    folder.mkdir(mode=0o700)
    path = folder / "talk.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    path.chmod(0o600)
    done = cli("--base-url", server.url, *action, env={"CHAT_PY_HOME": str(folder)})
    check(done)


# Command lines of the options chat.py has, with values of any kind.
values = st.one_of(
    odd_text,
    numbers.map(str),
    json_values.map(json.dumps),
    st.sampled_from(
        ["[" * 3000, "{", '"', "@broken.json", "@list.json", "nan", "-1", "0", "1e400"]
    ),
    st.binary(max_size=8).map(os.fsdecode),  # argv bytes that are not UTF-8
)
option = st.one_of(
    st.sampled_from(
        [
            "-c",
            "--chats",
            "--no-save",
            "--stream",
            "--no-stream",
            "-u",
            "-v",
            "--curl",
            "--models",
            "--version",
        ]
    ).map(lambda flag: [flag]),
    st.tuples(
        st.sampled_from(
            [
                "--chat",
                "--show",
                "--forget",
                "-f",
                "--image",
                "--detail",
                "--schema",
                "-m",
                "-s",
                "--temperature",
                "--max-tokens",
                "--reasoning-effort",
                "--reasoning",
                "--base-url",
                "--timeout",
                "--retries",
            ]
        ),
        values,
    ).map(list),
    st.tuples(st.just("-o"), odd_text, values).map(list),
    values.map(lambda value: [value]),  # a word of the question
)


@generated
@given(
    options=st.lists(option, max_size=5),
    stdin=st.binary(max_size=30),
    base_url=st.sampled_from([None, None, None, "http://127.0.0.1:abc/v1", "ftp://x"]),
)
def test_arguments(cli, server, tmp_path, options, stdin, base_url):
    (tmp_path / "broken.json").write_text('{"a": 1 "b": 2}')
    (tmp_path / "list.json").write_text('["name"]')
    args = [arg for each in options for arg in each]
    env = {"OPENAI_BASE_URL": base_url or server.url}
    if "--base-url" in args:  # only ever the fake server (or a URL that is no URL)
        args[args.index("--base-url") + 1 :] = [server.url] + args[args.index("--base-url") + 2 :]
    done, _ = run(cli, tmp_path, "--retries", "0", "--timeout", "5", *args, stdin=stdin, env=env)
    check(done)


# Base URLs made of the pieces that URL parsers read in different ways.
url_pieces = st.sampled_from(
    [
        *("@", ":", "\\", "/", "//", "?", "#", "[", "]", "%", "%5C", "%2F", "%40", ".", "..", "-"),
        *(" ", "\t", "\n", "\x00", "é", "\uff0e", "xn--", "::1", "1:2", "25", "eth0"),
        *("127.0.0.1", "localhost", "collector.example", "8080", "99999", "0", "v1", "user:pw"),
    ]
)
odd_pieces = st.lists(url_pieces | odd_text, max_size=4).map("".join)


def usual_or_odd(usual: list[str], odd):
    """Mostly one of the usual values, else an odd one."""
    return st.integers(0, 4).flatmap(lambda n: odd if n == 0 else st.sampled_from(usual))


schemes = usual_or_odd(
    ["http://", "https://", "HTTP://"], st.sampled_from(["http:/", "ftp://", ""])
)
parsed_urls = st.tuples(  # scheme, user, host, port and path; the odd ones as attacks send them
    schemes,
    usual_or_odd(
        ["", "user@", "user:pw@"],
        st.sampled_from(["evil.example\\@", "evil.example @", "a@b@", "evil.example\t@", "%5C@"])
        | odd_pieces.map("{}@".format),
    ),
    usual_or_odd(
        ["127.0.0.1", "localhost", "[::1]", "[2001:db8::1]", "a.b"],
        st.sampled_from(["evil..example", ".example", "[127.0.0.1]", "[::1", "évil.example"])
        | odd_pieces,
    ),
    usual_or_odd(
        ["", ":8080", ":0", ":65535", ":99999", ":"],
        st.sampled_from([":8080:80", ":abc", ":-1", ":\uff18"]) | odd_pieces.map(":{}".format),
    ),
    usual_or_odd(
        ["", "/v1", "/v1/", "?api-version=1", "#x"],
        st.sampled_from(["/v1\\..\\x", "\\@evil.example/v1", "#@evil.example/v1", "/v1 x"])
        | odd_pieces.map("/{}".format),
    ),
).map("".join)
base_urls = parsed_urls | st.tuples(schemes, st.lists(url_pieces | odd_text, max_size=10)).map(
    lambda scheme_and_pieces: scheme_and_pieces[0] + "".join(scheme_and_pieces[1])
)


@generated
@given(url=base_urls)
def test_base_urls(url):
    """A base URL chat.py takes goes where it says: requests' own reading of it (the request
    prepared, then urllib3's parse of that) names the host and port that chat.py shows, checks
    and saves (urlsplit's); any other is a usage error."""
    try:
        accepted = chat.check_base_url(url, "--base-url")
    except chat.UsageError as exc:
        assert str(exc).startswith("--base-url must be a plain http:// or https:// URL")
        return
    seen = urlsplit(accepted)
    prepared = requests.Request("POST", chat.api_url(accepted, "/chat/completions")).prepare()
    sent = urllib3.util.parse_url(prepared.url)
    assert (sent.host.strip("[]"), sent.port) == (seen.hostname, seen.port)
    assert chat.host_of(accepted).lower() == sent.netloc.rpartition("@")[2].lower()

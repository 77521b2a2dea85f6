"""The HTTP layer made visible: -v traces, --curl, what they never show (the key, a URL's
password, a server's terminal commands), and the inline script metadata."""

import base64
import json
import re
import shutil
import socket
import subprocess

import pytest
from conftest import (
    END_CHUNKS,
    FAKE_KEY,
    ROOT,
    SSE_HEAD,
    chunk_of,
    completion,
    http_response,
    json_response,
    stream_events,
)
from PIL import Image

# A raw control character of any kind: C0 but newline and tab, DEL, C1.
RAW_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
ROOT_VERSION = re.search(r'^__version__ = "(.+)"$', (ROOT / "chat.py").read_text(), re.MULTILINE)[1]
QUESTION_BODY = json.dumps(
    {"model": "gpt-5.4-mini", "messages": [{"role": "user", "content": "q"}]}, indent=2
)


def timeless(trace: str) -> str:
    """A trace with its measured times replaced by T."""
    return re.sub(r"(?m)(time to first byte|total time): \d+\.\d{3} s$", r"\1: T s", trace)


def request_trace(port: int, length: int, authorization: str, body: str) -> str:
    """The > lines of a POST to /v1/chat/completions as requests sends it."""
    return (
        f"> POST /v1/chat/completions HTTP/1.1\n> Host: 127.0.0.1:{port}\n"
        f"> User-Agent: chat.py/{ROOT_VERSION}\n> Accept-Encoding: gzip, deflate\n> Accept: */*\n"
        f"> Connection: keep-alive\n> Content-Length: {length}\n> Content-Type: application/json\n"
        + (f"> Authorization: {authorization}\n" if authorization else "")
        + "> \n"
        + "".join(f"> {line}\n" for line in body.splitlines())
    )


def response_trace(body: dict, length: int, status: str = "200 OK") -> str:
    return (
        f"< HTTP/1.1 {status}\n< Content-Type: application/json\n< Content-Length: {length}\n"
        "< Connection: close\n< \n* time to first byte: T s\n"
        + "".join(f"< {line}\n" for line in json.dumps(body, indent=2).splitlines())
    )


class TestVerbose:
    def test_trace_of_a_plain_exchange(self, cli, server):
        reply = completion("traced")
        server.reply(json_response(reply))
        done = cli("-v", "--base-url", server.url, "q")
        assert (done.code, done.out) == (0, "traced\n")
        assert timeless(done.err) == (
            request_trace(
                server.port,
                len(server.requests[0].raw),
                f"Bearer sk-…{FAKE_KEY[-4:]}",
                QUESTION_BODY,
            )
            + response_trace(reply, len(json.dumps(reply)))
            + "* total time: T s\n* tokens: prompt_tokens 5, completion_tokens 2, total_tokens 7\n"
        )
        assert server.requests[0].headers["authorization"] == f"Bearer {FAKE_KEY}"

    def test_stream_trace_shows_each_raw_line(self, cli, server):
        server.reply(
            SSE_HEAD + chunk_of(b": keep-alive\n\n" + stream_events("a", "b")) + END_CHUNKS
        )
        done = cli("-v", "--stream", "--base-url", server.url, "q")
        assert (done.code, done.out) == (0, "ab\n")
        lines = [line for line in done.err.splitlines() if line.startswith("| ")]
        assert lines[:2] == ["| : keep-alive", "| "]
        assert lines[-2:] == ["| data: [DONE]", "| "]
        assert sum(line.startswith("| data: {") for line in lines) == 4
        assert len(lines) == 12  # every line, the blank ones that end events included

    def test_cookie_values_are_cut(self, cli, server):
        cookie = "Set-Cookie: session=s3cr3t-cookie-value; Path=/\r\n"
        server.reply(json_response(completion(), headers=cookie))
        done = cli("-v", "--base-url", server.url, "q")
        assert "\n< Set-Cookie: session=…\n" in done.err
        assert "s3cr3t" not in done.err

    def test_the_response_body_is_traced_like_the_request(self, cli, server):
        long_text = "word " * 400
        image = "data:image/png;base64," + "QUJD" * 5000
        server.reply(json_response({**completion(long_text), "echo": image}))
        done = cli("-v", "--base-url", server.url, "q")
        assert (done.code, done.out) == (0, long_text + "\n")
        assert '\n<   "choices": [\n' in done.err
        assert f'"content": "{long_text[:500]}…(2,000 characters)"' in done.err
        assert '\n<   "echo": "data:image/png;base64,…(20,000 characters)"\n' in done.err
        assert max(len(line) for line in done.err.splitlines()) < 600

    def test_a_body_that_is_not_json_is_traced_as_text(self, cli, server):
        server.reply(http_response(502, b"upstream said no", "text/plain", reason="Bad Gateway"))
        done = cli("-v", "--retries", "0", "--base-url", server.url, "q")
        assert (done.code, done.out) == (1, "")
        assert timeless(done.err).endswith(
            "< Connection: close\n< \n* time to first byte: T s\n"
            "< upstream said no\n"
            "error: HTTP 502 Bad Gateway: upstream said no\n"
        )

    def test_each_image_gets_one_line_and_its_data_is_elided(self, cli, server, tmp_path):
        Image.new("RGB", (600, 400), "red").save(tmp_path / "wide.bmp")
        Image.new("L", (10, 10), 128).save(tmp_path / "small.png")
        inline = "data:image/gif;base64," + base64.b64encode(b"GIF89a" + bytes(300)).decode()
        done = cli(
            "-v",
            "--base-url",
            server.url,
            "--detail",
            "low",
            "--image",
            "wide.bmp",
            "--image",
            "small.png",
            "--image",
            "https://example.com/x.jpg",
            "--image",
            inline,
            "q",
        )
        assert (done.code, done.out) == (0, "Hello!\n")
        parts = server.bodies[0]["messages"][0]["content"][1:]
        lines = [line for line in done.err.splitlines() if line.startswith("* image ")]
        assert len(lines) == 4 and done.err.startswith("* image ")  # before the request
        assert re.fullmatch(
            r"\* image wide\.bmp: 600x400 BMP RGB, 720,054 bytes; sent 512x341 JPEG, "
            r"[\d,]+ bytes \(BMP is not a format the API takes\)",
            lines[0],
        )
        assert re.fullmatch(
            rf"\* image small\.png: 10x10 PNG L, {(tmp_path / 'small.png').stat().st_size} "
            r"bytes; sent as it is \(re-encoded it would take [\d,]+ bytes\)",
            lines[1],
        )
        assert lines[2:] == [
            "* image https://example.com/x.jpg: sent as given",
            "* image data:image/gif;base64,…(408 characters): sent as given",
        ]
        for part, mime in zip(parts, ("jpeg", "png", None, "gif"), strict=True):
            url = part["image_url"]["url"]
            if mime:
                data = url.split(",", 1)[1]
                assert f'"url": "data:image/{mime};base64,…({len(data):,} characters)"' in done.err
                assert data[:40] not in done.err


class TestControlCharactersAreShown:
    """What a server sends reaches the -v trace with its control characters made visible."""

    @pytest.mark.parametrize(
        "reply, shown",
        [
            (
                json_response(completion(), headers="X-Note: a\x1b]52;c;cm0gLXJmIH4=\x07b\r\n"),
                "\n< X-Note: a\\x1b]52;c;cm0gLXJmIH4=\\x07b\n",
            ),
            (
                json_response(completion(), headers="X-Note: \x9b31mred\r\n"),
                "\n< X-Note: \\x9b31mred\n",
            ),
            (
                json_response(completion(), reason="OK\x1b[2J\x1b[H"),
                "\n< HTTP/1.1 200 OK\\x1b[2J\\x1b[H\n",
            ),
            # JSON's own escape for ESC is already visible; a C1 character is not escaped by JSON
            (
                json_response(completion("x\x1b]0;pwned\x07y\x9b2Jz")),
                '\n<         "content": "x\\u001b]0;pwned\\u0007y\\x9b2Jz"\n',
            ),
            (
                SSE_HEAD
                + chunk_of(b": \x1b]52;c;cm0gLXJmIH4=\x07\n\n" + stream_events("ok"))
                + END_CHUNKS,
                "\n| : \\x1b]52;c;cm0gLXJmIH4=\\x07\n",
            ),
        ],
        ids=["header", "c1-header", "reason", "json-string", "sse-comment"],
    )
    def test_in_a_reply(self, cli, server, reply, shown):
        server.reply(reply)
        done = cli("-v", "--base-url", server.url, "q")
        assert done.code == 0, done.err
        assert shown in done.err
        assert not RAW_CONTROL.search(done.err), done.err

    def test_in_an_error_body_that_is_not_json(self, cli, server):
        body = b'{"error": "\x1b[2J\x1b]52;c;cm0gLXJmIH4=\x07 bad request"}'  # raw ESC: not JSON
        server.reply(http_response(400, body, "application/json"))
        done = cli("-v", "--base-url", server.url, "q")
        assert (done.code, done.out) == (1, "")
        shown = '{"error": "\\x1b[2J\\x1b]52;c;cm0gLXJmIH4=\\x07 bad request"}'
        assert done.err.endswith(f"\n< {shown}\nerror: HTTP 400 Bad Request: {shown}\n")
        assert not RAW_CONTROL.search(done.err), done.err

    @pytest.mark.parametrize(
        "reply, shown",
        [
            (
                http_response(502, b"bad\rgateway\x0bnow", "text/plain"),
                "\n< bad\\x0dgateway\\x0bnow\n",
            ),
            (
                json_response({"error": {"message": "next\x85line"}}, status=502),
                '\n<     "message": "next\\x85line"\n',
            ),
        ],
        ids=["lone-cr", "nel-in-json"],
    )
    def test_line_breaks_other_than_newline_stay_in_their_line(self, cli, server, reply, shown):
        server.reply(reply)
        done = cli("-v", "--retries", "0", "--base-url", server.url, "q")
        assert (done.code, done.out) == (1, "")
        assert shown in done.err


def free_port() -> socket.socket:
    """A bound socket that does not listen: connecting to its port is refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


class TestPasswordInTheBaseUrl:
    PASSWORD = "s3cret-pass-word"
    BASIC = "Basic " + base64.b64encode(b"user:" + PASSWORD.encode()).decode()

    def with_password(self, url: str) -> str:
        return url.replace("http://", f"http://user:{self.PASSWORD}@")

    @pytest.mark.parametrize(
        "key, authorization, received",
        [(FAKE_KEY, f"Bearer sk-…{FAKE_KEY[-4:]}", f"Bearer {FAKE_KEY}"), (None, "[...]", BASIC)],
    )
    def test_the_trace_shows_no_user_information(self, cli, server, key, authorization, received):
        reply = completion()
        server.reply(json_response(reply))
        done = cli("-v", "--base-url", self.with_password(server.url), "q", key=key)
        assert (done.code, done.out) == (0, "Hello!\n")
        assert timeless(done.err) == (
            request_trace(server.port, len(server.requests[0].raw), authorization, QUESTION_BODY)
            + response_trace(reply, len(json.dumps(reply)))
            + "* total time: T s\n* tokens: prompt_tokens 5, completion_tokens 2, total_tokens 7\n"
        )
        # like curl, credentials in the URL are used when there is no key
        assert server.requests[0].headers["authorization"] == received

    def test_curl_shows_stars(self, cli, server):
        done = cli("--curl", "--base-url", self.with_password(server.url), "q")
        assert (done.code, done.err) == (0, "")
        assert done.out.startswith(
            f"curl 'http://user:***@127.0.0.1:{server.port}/v1/chat/completions' \\\n"
        )
        assert self.PASSWORD not in done.out
        assert server.requests == []

    def test_a_404_shows_stars(self, cli, server):
        server.reply(json_response({"error": {"message": "no such route"}}, status=404))
        done = cli("--base-url", self.with_password(server.url), "q")
        assert (done.code, done.out) == (1, "")
        assert done.err == (
            f"error: HTTP 404 Not Found: no such route (POST http://user:***@127.0.0.1:"
            f"{server.port}/v1/chat/completions: check --base-url, and --model against "
            "what python chat.py --models lists)\n"
        )

    def test_a_refused_connection_names_only_the_host(self, cli):
        with free_port() as closed:
            port = closed.getsockname()[1]
            url = self.with_password(f"http://127.0.0.1:{port}/v1")
            done = cli("--base-url", url, "--retries", "1", "q")
        assert (done.code, done.out) == (3, "")
        refused = rf"cannot reach 127\.0\.0\.1:{port}: Connection refused"
        assert re.fullmatch(
            rf"warning: {refused}; retrying in \d\.\d s \(2 of 2\)\nerror: {refused}\n", done.err
        ), done.err
        assert len(cli.waits) == 1

    def test_a_bad_base_url_shows_stars(self, cli):
        done = cli("--base-url", f"ftp://user:{self.PASSWORD}@files.example/v1", "q")
        assert (done.code, done.out) == (2, "")
        assert done.err == (
            "error: --base-url must be a plain http:// or https:// URL with a valid host and port, "
            "not 'ftp://user:***@files.example/v1'\n"
        )


@pytest.mark.skipif(not shutil.which("curl"), reason="curl is not installed")
def test_curl_sends_the_same_request(cli, server, tmp_path):
    server.reply(json_response(completion("via curl")))
    Image.new("RGB", (64, 48), "red").save(tmp_path / "red.png")
    args = (
        "--base-url",
        server.url,
        "-m",
        "m1",
        "-s",
        'It\'s "quoted" $HOME `x`',
        "--temperature",
        "0.5",
        "--max-tokens",
        "9",
        "--image",
        "red.png",
        "What's this? \\ $(touch pwned) 'JSON'",
    )
    printed = cli("--curl", *args)
    assert (printed.code, printed.err) == (0, "")
    assert (
        FAKE_KEY not in printed.out and '-H "Authorization: Bearer $OPENAI_API_KEY"' in printed.out
    )
    assert server.requests == []  # --curl sends nothing
    done = subprocess.run(
        ["bash", "-c", printed.out],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"OPENAI_API_KEY": FAKE_KEY, "PATH": "/usr/bin:/bin"},
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["choices"][0]["message"]["content"] == "via curl"
    assert not (tmp_path / "pwned").exists()
    assert cli(*args).code == 0
    by_curl, by_chat = server.requests
    assert by_curl.body == by_chat.body
    assert (
        by_curl.body["messages"][1]["content"][0]["text"] == "What's this? \\ $(touch pwned) 'JSON'"
    )
    for header in ("authorization", "content-type", "user-agent"):
        assert by_curl.headers[header] == by_chat.headers[header]


@pytest.mark.parametrize(
    "args, key, start",
    [
        (
            ["--stream", "--base-url", "http://127.0.0.1:8080/v1"],
            None,
            (
                "curl -N http://127.0.0.1:8080/v1/chat/completions \\\n"
                "  -H 'Content-Type: application/json' \\\n"
                f"  -H 'User-Agent: chat.py/{ROOT_VERSION}' \\\n"
                "  --data-binary @- <<'JSON'\n"
                '{\n  "model": "gpt-5.4-mini",\n'
            ),
        ),
        # OpenAI's host needs a key: the command uses $OPENAI_API_KEY, even when none is set now
        (
            ["--max-tokens", "5"],
            None,
            (
                "curl https://api.openai.com/v1/chat/completions \\\n"
                "  -H 'Content-Type: application/json' \\\n"
                f"  -H 'User-Agent: chat.py/{ROOT_VERSION}' \\\n"
                '  -H "Authorization: Bearer $OPENAI_API_KEY" \\\n'
                "  --data-binary @- <<'JSON'\n"
                '{\n  "model": "gpt-5.4-mini",\n'
            ),
        ),
    ],
    ids=["local-stream", "openai"],
)
def test_curl_command(cli, args, key, start):
    done = cli("--curl", *args, "q", key=key)
    assert (done.code, done.err) == (0, "")
    assert done.out.startswith(start) and done.out.endswith("\n}\nJSON\n")
    body = json.loads(done.out.split("<<'JSON'\n", 1)[1].removesuffix("JSON\n"))
    expected = {"stream": True} if "--stream" in args else {"max_completion_tokens": 5}
    assert body == {
        "model": "gpt-5.4-mini",
        "messages": [{"role": "user", "content": "q"}],
        **expected,
    }


def script_metadata(text: str) -> str:
    """The PEP 723 `script` block, as its reference implementation reads it."""
    regex = r"(?m)^# /// (?P<type>[a-zA-Z0-9-]+)$\s(?P<content>(^#(| .*)$\s)+)^# ///$"
    blocks = [m for m in re.finditer(regex, text) if m.group("type") == "script"]
    assert len(blocks) == 1
    return "".join(
        line[2:] if line.startswith("# ") else line[1:]
        for line in blocks[0].group("content").splitlines(keepends=True)
    )


def test_inline_metadata_names_the_same_dependencies_as_requirements():
    tomllib = pytest.importorskip("tomllib")
    metadata = tomllib.loads(script_metadata((ROOT / "chat.py").read_text()))
    requirements = [
        line.strip()
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert sorted(metadata["dependencies"]) == sorted(requirements)
    assert metadata["requires-python"] == ">=3.10"

"""The HTTP layer made visible: -v traces, --curl, and the inline script metadata."""

import json
import re
import shutil
import subprocess

import pytest
from PIL import Image

from conftest import FAKE_KEY, ROOT, SSE_HEAD, END_CHUNKS, chunked, completion, stream_events


class TestVerbose:
    def test_trace_of_a_plain_exchange(self, run_chat, httpserver, base_url):
        httpserver.expect_request("/v1/chat/completions").respond_with_json(completion("traced"))
        done = run_chat("-v", "--base-url", base_url, "-s", "sys", "q")
        assert (done.code, done.out) == (0, "traced\n")
        err = done.err
        assert "> POST /v1/chat/completions HTTP/1.1\n" in err
        assert f"> Host: {base_url[7:-3]}\n" in err
        assert f"> Authorization: Bearer sk-…{FAKE_KEY[-4:]}\n" in err  # at most 4 characters shown
        assert FAKE_KEY not in err and FAKE_KEY[:-4] not in err
        assert "> User-Agent: chat.py/" in err and "> Content-Type: application/json" in err
        assert '>   "model": "gpt-5.4-mini",\n' in err  # the body, pretty-printed
        assert re.search(r"^< HTTP/1\.\d 200 OK$", err, re.M)
        assert re.search(r"^< Content-Type: application/json$", err, re.M)
        assert re.search(r"^\* time to first byte: \d+\.\d{3} s$", err, re.M)
        assert re.search(r"^\* total time: \d+\.\d{3} s$", err, re.M)
        assert "* tokens: prompt_tokens 5, completion_tokens 2, total_tokens 7" in err

    def test_authorization_shows_only_the_last_four(self, run_chat, httpserver, base_url):
        httpserver.expect_request("/v1/chat/completions").respond_with_json(completion())
        done = run_chat("-v", "--base-url", base_url, "q", key="sk-test-not-a-real-key-WXYZ")
        assert "> Authorization: Bearer sk-…WXYZ\n" in done.err

    def test_base64_image_data_is_elided_to_its_length(self, run_chat, httpserver, base_url, tmp_path):
        Image.effect_noise((300, 200), 50).save(tmp_path / "noise.png")
        httpserver.expect_request("/v1/chat/completions").respond_with_json(completion())
        done = run_chat("-v", "--base-url", base_url, "--image", "noise.png", "q")
        assert done.code == 0
        sent = json.loads(httpserver.log[0][0].data)["messages"][0]["content"][1]["image_url"]["url"]
        data = sent.split(",", 1)[1]
        assert f'"url": "data:image/jpeg;base64,…({len(data):,} characters)"' in done.err
        assert data[:40] not in done.err

    def test_stream_trace_shows_each_raw_line(self, run_chat, raw_server):
        def handler(conn, request):
            conn.sendall(SSE_HEAD + chunked(b": keep-alive\n\n" + stream_events("a", "b")) + END_CHUNKS)

        url, _ = raw_server(handler)
        done = run_chat("-v", "--stream", "--base-url", url, "q")
        assert (done.code, done.out) == (0, "ab\n")
        lines = [line for line in done.err.splitlines() if line.startswith("| ")]
        assert lines[:2] == ["| : keep-alive", "| "]
        assert lines[-2:] == ["| data: [DONE]", "| "]
        assert sum(line.startswith("| data: {") for line in lines) == 4

    def test_cookie_values_are_cut(self, run_chat, httpserver, base_url):
        httpserver.expect_request("/v1/chat/completions").respond_with_json(
            completion(), headers={"Set-Cookie": "session=s3cr3t-cookie-value; Path=/"})
        done = run_chat("-v", "--base-url", base_url, "q")
        assert "< Set-Cookie: session=…\n" in done.err
        assert "s3cr3t" not in done.err

    def test_the_response_body_is_traced_like_the_request(self, run_chat, httpserver, base_url):
        long_text = "word " * 400
        image = "data:image/png;base64," + "QUJD" * 5000
        httpserver.expect_request("/v1/chat/completions").respond_with_json(
            {**completion(long_text), "echo": image})
        done = run_chat("-v", "--base-url", base_url, "q")
        assert done.out == long_text + "\n"
        assert '<   "choices": [\n' in done.err
        assert f'"content": "{long_text[:500]}…(2,000 characters)"' in done.err
        assert '<   "echo": "data:image/png;base64,…(20,000 characters)"\n' in done.err
        assert max(len(line) for line in done.err.splitlines()) < 600

    def test_a_body_that_is_not_json_is_traced_as_text(self, run_chat, httpserver, base_url):
        httpserver.expect_request("/v1/chat/completions").respond_with_data("upstream said no", status=502)
        done = run_chat("-v", "--retries", "0", "--base-url", base_url, "q")
        assert "< upstream said no\n" in done.err and done.code == 1

    def test_each_image_gets_one_line(self, run_chat, httpserver, base_url, tmp_path):
        Image.new("RGB", (3000, 2000), "red").save(tmp_path / "big.bmp")
        Image.new("L", (10, 10), 128).save(tmp_path / "small.png")
        httpserver.expect_request("/v1/chat/completions").respond_with_json(completion())
        done = run_chat("-v", "--base-url", base_url, "--image", "big.bmp", "--image", "small.png",
                        "--image", "https://example.com/x.jpg", "q")
        lines = [line for line in done.err.splitlines() if line.startswith("* image ")]
        assert len(lines) == 3
        assert re.fullmatch(r"\* image big\.bmp: 3000x2000 BMP RGB, 18,000,054 bytes; sent 1536x1024 JPEG, "
                            r"[\d,]+ bytes \(BMP is not a format the API takes\)", lines[0])
        assert re.fullmatch(r"\* image small\.png: 10x10 PNG L, [\d,]+ bytes; sent as it is "
                            r"\(re-encoded it would take [\d,]+ bytes\)", lines[1])
        assert lines[2] == "* image https://example.com/x.jpg: sent as given"

    def test_stdout_is_exactly_the_reply(self, run_chat, httpserver, base_url):
        httpserver.expect_request("/v1/chat/completions").respond_with_json(completion("only this"))
        assert run_chat("-v", "--base-url", base_url, "q").out == "only this\n"


def run_curl_command(command: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, timeout=30)


@pytest.mark.skipif(not shutil.which("curl"), reason="curl is not installed")
class TestCurl:
    def test_curl_sends_the_same_request(self, run_chat, httpserver, base_url, tmp_path):
        httpserver.expect_request("/v1/chat/completions").respond_with_json(completion("via curl"))
        Image.new("RGB", (64, 48), "red").save(tmp_path / "red.png")
        args = ("--base-url", base_url, "-m", "m1", "-s", "It's \"quoted\" $HOME `x`",
                "--temperature", "0.5", "--max-tokens", "9", "--image", "red.png",
                "What's this? \\ $(rm -rf /)")
        printed = run_chat("--curl", *args)
        assert printed.code == 0 and printed.err == ""
        assert FAKE_KEY not in printed.out and "$OPENAI_API_KEY" in printed.out
        assert httpserver.log == []  # --curl sends nothing
        done = run_curl_command(printed.out, {"OPENAI_API_KEY": FAKE_KEY, "PATH": "/usr/bin:/bin"})
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["choices"][0]["message"]["content"] == "via curl"
        assert run_chat(*args).code == 0
        (by_curl, _), (by_chat, _) = httpserver.log
        assert json.loads(by_curl.data) == json.loads(by_chat.data)
        for header in ("Authorization", "Content-Type", "User-Agent"):
            assert by_curl.headers[header] == by_chat.headers[header]

    def test_curl_streams_with_no_buffering(self, run_chat):
        printed = run_chat("--curl", "--stream", "--base-url", "http://127.0.0.1:8080/v1", "q", key=None)
        assert printed.out.startswith("curl -N http://127.0.0.1:8080/v1/chat/completions")
        assert "Authorization" not in printed.out
        assert '"stream": true' in printed.out

    def test_curl_needs_no_key_for_openai(self, run_chat):
        printed = run_chat("--curl", "--max-tokens", "5", "q", key=None)
        assert printed.code == 0
        assert printed.out.startswith("curl https://api.openai.com/v1/chat/completions")
        assert '"max_completion_tokens": 5' in printed.out
        assert '-H "Authorization: Bearer $OPENAI_API_KEY"' in printed.out


def script_metadata(text: str) -> str:
    """The PEP 723 `script` block, as its reference implementation reads it."""
    regex = r"(?m)^# /// (?P<type>[a-zA-Z0-9-]+)$\s(?P<content>(^#(| .*)$\s)+)^# ///$"
    blocks = [m for m in re.finditer(regex, text) if m.group("type") == "script"]
    assert len(blocks) == 1
    return "".join(line[2:] if line.startswith("# ") else line[1:]
                   for line in blocks[0].group("content").splitlines(keepends=True))


def test_inline_metadata_names_the_same_dependencies_as_requirements():
    tomllib = pytest.importorskip("tomllib")
    metadata = tomllib.loads(script_metadata((ROOT / "chat.py").read_text()))
    requirements = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    assert sorted(metadata["dependencies"]) == sorted(requirements)
    assert metadata["requires-python"] == ">=3.10"

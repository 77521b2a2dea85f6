"""Shared fixtures: a clean environment, chat.py run as a subprocess, and local servers.

Every server here listens on 127.0.0.1 and is started by the test that uses it.
pytest-httpserver serves ordinary exchanges; `raw_server` writes exact bytes for
the cases that need control over chunk boundaries, delays and dropped connections.
"""

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHAT = ROOT / "chat.py"
sys.path.insert(0, str(ROOT))

FAKE_KEY = "sk-test-not-a-real-key-5f3a9c"
CHAT_PY_VARS = ("CHAT_PY_NO_SAVE", "CHAT_PY_TRACEBACK", "NO_COLOR")
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "realmodel: runs chat.py against a real local model server (tests/setup_realmodel.sh)")


REAL_STATE = Path.home() / ".local" / "state" / "chat-py"


def listing(folder: Path) -> list:
    if not folder.is_dir():
        return []
    return sorted((path.name, path.stat().st_mtime_ns) for path in folder.iterdir())


@pytest.fixture(scope="session", autouse=True)
def real_home_is_untouched():
    """Fails the run if any test saved a conversation in the real home folder."""
    before = listing(REAL_STATE)
    yield
    assert listing(REAL_STATE) == before, f"a test wrote to {REAL_STATE}"


def child_env(**extra) -> dict:
    """A minimal environment for chat.py started by a test: PATH, the test's own HOME and
    CHAT_PY_HOME (set by clean_environ), the fake key, and extra."""
    return {"PATH": os.environ["PATH"], "HOME": os.environ["HOME"],
            "CHAT_PY_HOME": os.environ["CHAT_PY_HOME"], "OPENAI_API_KEY": FAKE_KEY, **extra}


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch, tmp_path):
    """No proxies, no OPENAI_* or CHAT_PY_* settings from the developer's shell, a fresh working
    directory (so no .env file from the checkout is read), and HOME and CHAT_PY_HOME in a temp
    folder: a test never reads or writes the real home folder."""
    for name in list(os.environ):
        if (name.lower() in PROXY_VARS or name.upper() in PROXY_VARS
                or name.startswith(("OPENAI_", "XDG_")) or name in CHAT_PY_VARS):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CHAT_PY_HOME", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def httpserver_listen_address():
    return ("127.0.0.1", 0)


@pytest.fixture
def base_url(httpserver):
    return httpserver.url_for("/v1")


def completion(content="Hello!", finish_reason="stop", **message):
    """A chat-completions response body."""
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "model": "test-model",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content, **message},
             "finish_reason": finish_reason}
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }


def chunk_event(content=None, finish_reason=None, role=None, ascii_only=True) -> bytes:
    """One `data:` event of a streamed completion (with ascii_only=False, raw UTF-8 in the JSON)."""
    delta = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    payload = {"id": "chatcmpl-test", "object": "chat.completion.chunk",
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
    return b"data: " + json.dumps(payload, ensure_ascii=ascii_only).encode() + b"\n\n"


def stream_events(*texts: str) -> bytes:
    """A whole stream in the shape OpenAI sends: role delta, content deltas, stop, [DONE]."""
    return (chunk_event(role="assistant", content="")
            + b"".join(chunk_event(text) for text in texts)
            + chunk_event(finish_reason="stop")
            + b"data: [DONE]\n\n")


@pytest.fixture
def run_chat(tmp_path):
    """Run chat.py as users do; return code, out and err (stdout and stderr as text)."""

    def run(*args, stdin: bytes | str = b"", env: dict | None = None, key: str | None = FAKE_KEY,
            timeout: float = 60):
        full_env = dict(os.environ)
        full_env["PYTHONUNBUFFERED"] = "0"
        if key is not None:
            full_env["OPENAI_API_KEY"] = key
        full_env.update(env or {})
        if isinstance(stdin, str):
            stdin = stdin.encode()
        done = subprocess.run([sys.executable, str(CHAT), *args], input=stdin, capture_output=True,
                              env=full_env, cwd=tmp_path, timeout=timeout)
        return SimpleNamespace(code=done.returncode, out=done.stdout.decode(),
                               err=done.stderr.decode(), raw_out=done.stdout)

    return run


def read_request(conn: socket.socket) -> dict:
    """Read one HTTP request (headers and Content-Length body) from a socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = conn.recv(65536)
        if not more:
            return {}
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", 0))
    while len(body) < length:
        more = conn.recv(65536)
        if not more:
            break
        body += more
    return {"line": request_line, "headers": headers, "body": json.loads(body) if body else None}


@pytest.fixture
def raw_server():
    """start(handler) -> (base_url, requests): a TCP server whose handler(conn, request) writes
    raw bytes. Each connection runs in its own thread; requests collects what arrived."""
    sockets = []

    def start(handler):
        server = socket.create_server(("127.0.0.1", 0))
        sockets.append(server)
        received = []

        def handle(conn):
            with conn:
                request = read_request(conn)
                if not request:
                    return
                received.append(request)
                try:
                    handler(conn, request)
                except OSError:
                    pass  # the client went away: that is what some tests do

        def serve():
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                threading.Thread(target=handle, args=(conn,), daemon=True).start()

        threading.Thread(target=serve, daemon=True).start()
        return f"http://127.0.0.1:{server.getsockname()[1]}/v1", received

    yield start
    for server in sockets:
        server.close()


SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
END_CHUNKS = b"0\r\n\r\n"


def chunked(data: bytes) -> bytes:
    """One chunk of a chunked-encoded body."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def json_response(status: int, body, reason: str = "", headers: str = "") -> bytes:
    """A complete HTTP response with a JSON (or raw bytes) body."""
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    reason = reason or {200: "OK", 401: "Unauthorized", 429: "Too Many Requests",
                        500: "Internal Server Error",
                        503: "Service Unavailable"}.get(status, "Status")
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n{headers}"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode() + payload


@pytest.fixture
def call_main(monkeypatch, capsys):
    """Run chat.main() in this process with the given stdin; retry waits are recorded, not slept.

    Returns a function giving (code, out, err); `.waits` lists the sleeps asked for."""
    import io

    import chat

    waits = []
    monkeypatch.setattr(chat.time, "sleep", waits.append)
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)

    def call(*args, stdin: bytes = b""):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        code = chat.main(list(args))
        captured = capsys.readouterr()
        return SimpleNamespace(code=code, out=captured.out, err=captured.err)

    call.waits = waits
    return call

"""What every test shares: one fake server, one way to build its replies, one way to run chat.py.

- `server` is a TCP server on 127.0.0.1 that answers each request with the next scripted
  response: bytes written as they are, or a function given the socket and the request, for
  byte-level control (chunk boundaries, delays, dropped connections). It records what came.
- `json_response`, `sse_response`, `completion`, `chunk` and `stream_events` build replies.
- `cli(...)` runs chat.main() in this process with its own surroundings (streams, terminal
  flags, environment, folder); `cli.process(...)` starts a real process, for what needs one.

Every test runs with HOME and CHAT_PY_HOME in its own temporary folder, in that folder.
"""

import importlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHAT = ROOT / "chat.py"
sys.path.insert(0, str(ROOT))

chat = importlib.import_module("chat")  # from the folder above, put first on the path

FAKE_KEY = "sk-test-not-a-real-key-5f3a9c"
# Variables of the developer's shell that would change what chat.py or requests do.
LEAKY = ("PROXY", "CA_BUNDLE", "SSL_CERT", "OPENAI_", "XDG_", "CHAT_PY_", "NO_COLOR", "NETRC")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "realmodel: runs chat.py against a real local model server (tests/setup_realmodel.sh)",
    )


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No proxies or chat.py settings from the developer's shell, HOME and CHAT_PY_HOME in a
    temporary folder, and that folder as the current one: no test reads or writes the real
    home folder, nor a .env of the checkout."""
    for name in list(os.environ):
        if any(part in name.upper() for part in LEAKY):
            monkeypatch.delenv(name)
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CHAT_PY_HOME", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)


# ------------------------------------------------------------------ the fake server


def read_request(conn: socket.socket) -> SimpleNamespace | None:
    """One HTTP request (headers and a Content-Length body) from a socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = conn.recv(65536)
        if not more:
            return None
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
    method, path, _ = request_line.split(" ", 2)
    return SimpleNamespace(
        method=method, path=path, headers=headers, raw=body, body=json.loads(body) if body else None
    )


class FakeServer:
    """A server on 127.0.0.1 answering each request with the next of its replies (the last one
    again when they run out). A reply is bytes, or a function(conn, request) that writes what
    it likes. Each connection is served on its own thread and closed after one exchange."""

    def __init__(self):
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.replies = [json_response(completion())]
        self.requests = []
        self.lock = threading.Lock()
        threading.Thread(target=self.serve, daemon=True).start()

    def reply(self, *replies) -> "FakeServer":
        self.replies = list(replies)
        return self

    def serve(self):
        while True:
            try:
                conn, _ = self.socket.accept()
            except OSError:
                return
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn):
        with conn:
            request = read_request(conn)
            if request is None:
                return
            with self.lock:
                self.requests.append(request)
                reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
            try:
                reply(conn, request) if callable(reply) else conn.sendall(reply)
            except OSError:
                pass  # the client went away: that is what some tests do

    @property
    def bodies(self) -> list:
        return [request.body for request in self.requests]

    def wait_for_requests(self, count: int = 1, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count:
            assert time.monotonic() < deadline, f"{len(self.requests)} requests, not {count}"
            time.sleep(0.01)

    def close(self):
        self.socket.close()


@pytest.fixture
def server():
    fake = FakeServer()
    yield fake
    fake.close()


@pytest.fixture
def another_server():
    """More servers, for tests that need two (a redirect, a proxy)."""
    made = []

    def make() -> FakeServer:
        made.append(FakeServer())
        return made[-1]

    yield make
    for fake in made:
        fake.close()


# ------------------------------------------------------------------ replies


REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def http_response(
    status: int, body: bytes, content_type: str, headers: str = "", reason: str | None = None
) -> bytes:
    reason = REASONS.get(status, "Status") if reason is None else reason
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n{headers}"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode("latin-1") + body


def json_response(body, status: int = 200, headers: str = "", reason: str | None = None) -> bytes:
    """A whole HTTP response with a JSON body (or the bytes given).

    headers: "Name: value\\r\\n" lines."""
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http_response(status, payload, "application/json", headers, reason)


def sse_response(*events: bytes, chunked: bool = True) -> bytes:
    """A whole event-stream response: one chunk per event (or one plain body, not chunked)."""
    head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n"
    if not chunked:
        return (head + "\r\n").encode() + b"".join(events)
    return (
        (head + "Transfer-Encoding: chunked\r\n\r\n").encode()
        + b"".join(chunk_of(event) for event in events if event)
        + b"0\r\n\r\n"
    )


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
)
END_CHUNKS = b"0\r\n\r\n"


def chunk_of(data: bytes) -> bytes:
    """One chunk of a chunked-encoded body."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def completion(content="Hello!", finish_reason="stop", **message) -> dict:
    """A chat-completions response body."""
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "model": "test-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, **message},
                "finish_reason": finish_reason,
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }


def chunk(content=None, finish_reason=None, index=0, ascii_only=True, **delta) -> bytes:
    """One `data:` event of a streamed completion (ascii_only=False: raw UTF-8 in the JSON)."""
    if content is not None:
        delta["content"] = content
    payload = {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "model": "test-model",
        "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason}],
    }
    return b"data: " + json.dumps(payload, ensure_ascii=ascii_only).encode() + b"\n\n"


def stream_events(*texts: str) -> bytes:
    """A whole stream in the shape OpenAI sends: role delta, content deltas, stop, [DONE]."""
    return (
        chunk("", role="assistant")
        + b"".join(chunk(text) for text in texts)
        + chunk(finish_reason="stop")
        + b"data: [DONE]\n\n"
    )


def nap(seconds: float) -> None:
    time.sleep(seconds)


# ------------------------------------------------------------------ running chat.py


class Lines:
    """What a person types in conversation mode: each item a line, or an exception to raise
    (KeyboardInterrupt for Ctrl-C); EOFError (Ctrl-D) when they run out. The prompts shown
    are kept in .prompts."""

    def __init__(self, items):
        self.items = list(items)
        self.prompts = []

    def __call__(self, prompt: str = "") -> str:
        self.prompts.append(prompt)
        if not self.items:
            raise EOFError
        item = self.items.pop(0)
        if isinstance(item, (BaseException, type)):
            raise item
        return item


class Runner:
    """cli(*args) runs chat.main() in this process; cli.process(*args) starts chat.py."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.waits = []  # the retry waits chat.py asked for (in-process runs do not sleep)

    def environ(self, key, env) -> dict:
        environ = {
            "PATH": os.environ["PATH"],
            "HOME": os.environ["HOME"],
            "CHAT_PY_HOME": os.environ["CHAT_PY_HOME"],
        }
        if key is not None:
            environ["OPENAI_API_KEY"] = key
        return {**environ, **(env or {})}

    def __call__(
        self,
        *args,
        stdin: bytes | str | None = b"",
        env: dict | None = None,
        key: str | None = FAKE_KEY,
        ttys=(False, False, False),
        lines=None,
        cwd: Path | None = None,
        raise_bugs: bool = True,
    ) -> SimpleNamespace:
        """raise_bugs: an exception that is not a ChatError propagates, with its traceback."""
        stdout, stderr = io.StringIO(), io.StringIO()
        stdin = stdin.encode() if isinstance(stdin, str) else stdin
        typed = Lines(lines or [])
        surroundings = chat.Env(
            None if stdin is None else io.BytesIO(stdin),
            stdout,
            stderr,
            self.environ(key, env),
            str(cwd or self.folder),
            ttys,
            typed,
            self.waits.append,
            raise_bugs,
        )
        code = chat.main([str(arg) for arg in args], surroundings)
        return SimpleNamespace(
            code=code, out=stdout.getvalue(), err=stderr.getvalue(), prompts=typed.prompts
        )

    def process(
        self,
        *args,
        stdin: bytes | str = b"",
        env: dict | None = None,
        key: str | None = FAKE_KEY,
        timeout: float = 30,
        python: str = sys.executable,
        start: bool = False,
    ):
        """chat.py in a real process: its result, or (start=True) the running Popen."""
        command = [python, str(CHAT), *map(str, args)]
        if start:
            return subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self.environ(key, env),
                cwd=self.folder,
            )
        stdin = stdin.encode() if isinstance(stdin, str) else stdin
        done = subprocess.run(
            command,
            input=stdin,
            capture_output=True,
            env=self.environ(key, env),
            cwd=self.folder,
            timeout=timeout,
            check=False,
        )
        return SimpleNamespace(
            code=done.returncode,
            out=done.stdout.decode(errors="replace"),
            err=done.stderr.decode(errors="replace"),
            raw_out=done.stdout,
        )


@pytest.fixture
def cli(tmp_path) -> Runner:
    return Runner(tmp_path)


def saved(folder: Path | None = None) -> dict:
    """The saved conversations: {name: [turn, ...]} (each line parsed; only \n ends one, as in
    chat.py: U+2028 in a turn is text)."""
    folder = folder or Path(os.environ["CHAT_PY_HOME"])
    return {
        path.name.removesuffix(".jsonl"): [
            json.loads(line) for line in path.read_text().split("\n") if line.strip()
        ]
        for path in sorted(folder.glob("*.jsonl"))
    }


def settings_file() -> Path:
    """Where this test's settings file is looked for: ~/.config/chat-py/env, HOME being its own."""
    return Path(os.environ["HOME"], ".config", "chat-py", "env")


def missing_key_error() -> str:
    """What chat.py says when OpenAI is asked without a key."""
    return (
        "error: OPENAI_API_KEY is not set: export it, or put it in ./.env (see .env.example) or "
        f"{settings_file()}; a local server needs no key: pass its --base-url\n"
    )


def write_settings(text: str, path: Path | None = None) -> Path:
    """The user's own settings file (settings_file() unless path): text, 0600."""
    path = path or settings_file()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o600)
    return path

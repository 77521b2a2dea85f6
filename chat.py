#!/usr/bin/env python3
# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "requests>=2.32",
#     "python-dotenv>=1.0",
#     "Pillow>=10.1",
# ]
# ///
"""Ask an OpenAI-compatible chat-completions API from the command line.

    $ git diff | python chat.py "Review this"
    $ python chat.py -c "And the tests?"                 # go on from the last question
    $ python chat.py --image missing.jpg "What is this?"
    error: cannot read image missing.jpg: No such file or directory

The reply goes to stdout; reasoning, warnings and errors to stderr. Exit codes: 0 reply printed,
1 API error, 2 usage or input error, 3 network failure, 4 timeout, 70 a bug, 130 interrupted.
"""

from __future__ import annotations

import signal

if __name__ == "__main__":
    # Ctrl-C during the imports below would end in a traceback; until main() hands SIGINT
    # back to Python, it just ends the process (the shell reports 130).
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import argparse
import json
import math
import os
import re
import stat
import sys
import time
from collections import namedtuple
from enum import IntEnum
from urllib.parse import urlsplit

# requests, python-dotenv and Pillow are imported where they are used: --help, --chats, --show,
# --curl and usage errors start without them.

__version__ = "4.0.0"

DEFAULT_MODEL = "gpt-5.4-mini"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
# Seconds to wait for each read: a reasoning model, or a local model on a CPU, can be silent
# for minutes (600 s is the official OpenAI SDK's default). Connecting never needs that long.
DEFAULT_TIMEOUT = 600.0
CONNECT_TIMEOUT = 15.0
MAX_DEPTH = 200  # levels of JSON in a request: far more than any uses, far less than Python's stack
MAX_TIMEOUT = (
    1e9  # seconds, 31 years: a longer --timeout means the same, and overflows a socket's timeout
)
DEFAULT_RETRIES = 2
USER_AGENT = f"chat.py/{__version__}"
INITIAL_RETRY_DELAY, MAX_RETRY_DELAY = 0.5, 8.0  # seconds; the delay doubles on each retry
MAX_RETRY_AFTER = 120.0  # seconds; a server asking for longer gets no retry
RETRY_STATUSES = {408, 409, 429}  # and every 5xx

# What a server or a file can make chat.py hold: a reply (after HTTP decompression), a stream's
# text or one SSE event up to MAX_REPLY; piped stdin or a -f file up to MAX_INPUT, read no
# further. An error body is cut at MAX_ERROR_BODY; a larger .env is ignored, a larger settings
# file refused.
MAX_REPLY, MAX_INPUT, MAX_ERROR_BODY, MAX_DOTENV = 64 * 2**20, 16 * 2**20, 2**20, 64 * 1024
LARGE_QUESTION = 1_000_000  # characters; a larger one gets a note of its size in tokens (about /4)

# ./.env supplies a key and a model, never a destination: a base URL, proxy, CA bundle or state
# folder in a cloned repository's .env would take the questions, the key or the conversations.
# Those named here get a warning. The user's own settings file may set more.
DOTENV_NAMES = ("OPENAI_API_KEY", "OPENAI_MODEL")
IGNORED_IN_DOTENV = re.compile(
    r"OPENAI_BASE_URL|CHAT_PY_\w+|XDG_\w+|\w*_PROXY|\w*_CA_BUNDLE|SSL_CERT_\w+", re.IGNORECASE
)
SETTINGS_NAMES = (
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "OPENAI_MODEL",
    "CHAT_PY_HOME",
    "CHAT_PY_NO_SAVE",
)
# A base URL as requests and urllib3 read it too: http(s)://, a user and password, a host of
# DNS labels or an [IPv6 address], a port, then printable ASCII. Nothing a parser could read two
# ways (a backslash, a space, %-escapes or non-ASCII letters in the host), so requests connects
# to the host that chat.py shows, saves and decides on.
BASE_URL = re.compile(
    r"https?://(?:[\w.~!$&'()*+,;=:%-]*@)?"
    r"(?P<host>[a-z0-9_-]{1,63}(?:\.[a-z0-9_-]{1,63})*|\[(?P<ipv6>[0-9a-f:.]+)\])"
    r"(?::(?P<port>[0-9]{1,5}))?(?:[/?#][!-\[\]-~]*)?",
    re.IGNORECASE | re.ASCII,
)

# The pixels of a local image worth uploading: "low" is seen as one 512x512 thumbnail; "high"
# (and "auto") keeps 2048 px on the long side and 1536 patches of 32x32.
LOW_DETAIL_BOX, HIGH_DETAIL_LONG_SIDE, HIGH_DETAIL_PIXELS = 512, 2048, 1536 * 32 * 32
JPEG_QUALITY = 85
MAX_DECODED = 128 * 2**20  # bytes of pixels Pillow may decode: converting takes a few times more
# The formats the API takes as they are, and their plain 8-bit modes: a file like this can be
# sent byte for byte (16-bit, CMYK and other modes are converted).
PLAIN_MODES = {"1", "L", "LA", "P", "RGB", "RGBA"}
AS_IS_MODES = {"PNG": PLAIN_MODES, "GIF": PLAIN_MODES, "WEBP": PLAIN_MODES, "JPEG": {"L", "RGB"}}
TEXT_SNIFF_BYTES = 8192  # -f judges a file by this much of its start
# An MPEG audio frame header (MP3): 11 sync bits, MPEG 1, 2 or 2.5, layer III; a bitrate index
# of 1 to 14 and a sample rate index of 0 to 2.
MP3_FRAME = (
    rb"\xff[\xe2\xe3\xf2\xf3\xfa\xfb]["
    + re.escape(bytes(byte for byte in range(0x10, 0xF0) if byte & 0x0C != 0x0C))
    + rb"]"
)
# The kinds of content part, by type (a new kind is a row here): what --show and -v call one,
# what a hint calls them, the formats -f sends as one, the first bytes -f knows them by (the
# first kind that matches wins), the words of a server's error about one, and how a file's
# name, bytes and Base64 become the part's value (text goes inline, images through Pillow).
PartKind = namedtuple("PartKind", "word noun formats magic refused value")
PART_KINDS = {
    "image_url": PartKind(
        "image",
        "images",
        "PNG, JPEG, GIF, WebP, BMP, TIFF",
        rb"\x89PNG\r\n\x1a\n|\xff\xd8\xff|GIF8[79]a|RIFF....WEBP|BM....\0\0\0\0|II\*\0|MM\0\*",
        r"image",
        None,
    ),
    "file": PartKind(
        "file",
        "PDF files",
        "",
        rb"%PDF-",
        r"\bfile\b|file_data|pdf",
        lambda name, data, encoded: {
            "filename": os.path.basename(name),
            "file_data": f"data:application/pdf;base64,{encoded}",
        },
    ),
    "input_audio": PartKind(
        "audio",
        "audio",
        "WAV, MP3",
        rb"RIFF....WAVE|ID3[\2-\4]\0|" + MP3_FRAME,
        r"audio",
        lambda name, data, encoded: {
            "data": encoded,
            "format": "wav" if data[:4] == b"RIFF" else "mp3",
        },
    ),
    "text": PartKind("text", "text", "", rb"[^\0]*\Z", None, None),
}
# A server saying it cannot take some content part (llama-server: "unsupported content[].type").
PART_REFUSED = re.compile(
    r"unsupported content|content\[\]|invalid content|content.{0,40}not supported", re.IGNORECASE
)

# --schema's short form: "name, age int, bio: one sentence"
SHORT_TYPES = {
    "str": "string",
    "string": "string",
    "int": "integer",
    "integer": "integer",
    "float": "number",
    "number": "number",
    "bool": "boolean",
    "boolean": "boolean",
}
FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
FORMAT_REJECTED = re.compile(r"response_format|json_schema")  # a server refusing --schema's form
# A chat template refusing the system role: Gemma's raise_exception('System role not supported'),
# Mistral's 'Only user and assistant roles are supported!'
SYSTEM_REFUSED = re.compile(
    r"system role (is )?not supported|only user and assistant roles are supported", re.IGNORECASE
)
TOOLS_WITH_REASONING = re.compile(
    r"function tools with reasoning_effort are not supported", re.IGNORECASE
)

NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
TURN_TEXTS = ("time", "model", "system", "answered_by")  # fields of a saved turn that are text
# A retried turn's line starts with this, so --chats can count turns without parsing lines.
RETRY_LINE_START = b'{"retry": true'
UNDO_LINE = b'{"undo": true}'  # /undo appends it: the turn before it is dropped
HISTORY_FILE, HISTORY_LINES = (
    "history",
    1000,
)  # conversation mode's line history, in the state folder

PASTE_ON = "\x1b[?2004h"  # bracketed paste: the terminal marks a paste, so it is one message
READ_SIZE = 64 * 1024  # most bytes taken from the socket per read
MAX_TOOL_CALLS = 1000  # in one reply; their names, ids and arguments count toward MAX_REPLY too
LINE_CHARS, BANNER_CHARS = 300, 80  # the longest error: or warning: line, banner line
TRACE_STRING_CHARS, TRACE_TEXT_CHARS = 500, 2000  # -v cuts a JSON body's strings, or other text
DATA_URL = re.compile(r"(data:[\w.+-]+/[\w.+-]+;base64,)([A-Za-z0-9+/=]+)")
BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{100,}={0,2}")
# What a terminal would obey as a command: C0 controls but newline and tab, a carriage return
# not followed by a newline, DEL, and the C1 controls; and what it would not show as it is: the
# format characters (Unicode's category Cf: bidi overrides, zero-width and tag characters ...)
# and the line and paragraph separators.
CONTROL_CHARS = re.compile(
    r"\r(?!\n)|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\xad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891"
    r"\u08e2\u180e\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb"
    r"\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
    r"\U000e0000-\U000e007f]"
)
TAG_CHARS = re.compile(r"[\U000e0000-\U000e007f]")  # invisible ASCII, each, that a model reads
CONTEXT_OVERFLOW = re.compile(
    r"context_length_exceeded|context (length|window)|exceeds the available context size|"
    r"context size has been exceeded|total length of all messages",
    re.IGNORECASE,
)
COMPLETION_BUDGET = re.compile(r"in the completion|max_(completion_|new_)?tokens", re.IGNORECASE)
# An error that says the request itself can never work, whatever its status (llama.cpp answers
# "image input is not supported" and "tools param requires --jinja flag" with a 500).
REQUEST_CANNOT_WORK = re.compile(
    # --\w+(?:-\w+)*, not --\w[\w-]*: on "--a--a--a..." that one backtracks in quadratic time
    r"invalid_request_error|not_supported_error|is not supported|requires --\w|--\w+(?:-\w+)* flag",
    re.IGNORECASE,
)
# Reasoning in every shape a reply carries it: these fields of a message or a stream delta (the
# first one present counts: OpenRouter sends the same thoughts in two), and the parts of
# `content` or reasoning_details by type: the key holding their text, and whether it is
# reasoning (other types, reasoning.encrypted among them, are skipped).
REASONING_FIELDS = ("reasoning_content", "reasoning", "reasoning_details")
REPLY_PARTS = {
    "text": ("text", False),
    "thinking": ("thinking", True),  # Mistral: itself a list of text parts
    "reasoning.text": ("text", True),
    "reasoning.summary": ("summary", True),
}
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"  # a block at the start of the text is reasoning
MIN_SECRET_CHARS = 8  # shorter keys are placeholders ("none") that masking would garble text for
DIM, NORMAL, ERASE_LINE = "\x1b[2m", "\x1b[0m", "\r\x1b[K"  # chat.py's own styling on a terminal
SPINNER_FRAMES = "|/-\\"
# Windows (native, not WSL): its own folders and keys; read by the code at call time, so the
# tests can choose it.
WINDOWS = os.name == "nt"
# What to install, by the module that fails to import without it.
PACKAGES = {
    "requests": "requests",
    "urllib3": "requests",
    "charset_normalizer": "requests",
    "idna": "requests",
    "certifi": "requests",
    "dotenv": "python-dotenv",
    "PIL": "Pillow",
}


# ---------------------------------------------------------------- errors and records


class ExitStatus(IntEnum):
    """Exit codes of chat.py, as documented in the README."""

    OK = 0
    API_ERROR = 1
    USAGE = 2
    NETWORK = 3
    TIMEOUT = 4
    BUG = 70  # sysexits' EX_SOFTWARE
    INTERRUPTED = 130


class ChatError(Exception):
    """A failure told in one line, with its exit code, advice kept whole (hint), what a retry
    warning says (brief), and whether and when another try could help."""

    exit_status = ExitStatus.API_ERROR

    def __init__(
        self,
        message: str,
        hint: str = "",
        brief: str = "",
        retryable: bool = False,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.hint, self.brief = hint, brief or message
        self.retryable, self.retry_after = retryable, retry_after


class TooSlow(BaseException):
    """within()'s alarm: not an Exception, which a library could swallow (http.cookiejar catches
    every Exception while it parses cookies, and goes on)."""


def raise_too_slow(*_) -> None:
    raise TooSlow


class UsageError(ChatError):
    exit_status = ExitStatus.USAGE


class NetworkError(ChatError):
    exit_status = ExitStatus.NETWORK


class TimedOut(ChatError):
    exit_status = ExitStatus.TIMEOUT


class ApiError(ChatError):
    """The server answered, but not usably: an HTTP error status, or a reply chat.py cannot use."""

    def __init__(self, message: str, status: int = 0, overflow: bool = False, **details):
        super().__init__(message, **details)
        self.status, self.overflow = status, overflow


def redact(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        text = text.replace(secret, "[redacted]") if len(secret) >= MIN_SECRET_CHARS else text
    return text


def elide_base64(text: str) -> str:
    """text with each data: URL's payload, and any other long Base64 run, cut to its length."""
    text = DATA_URL.sub(lambda match: f"{match[1]}…({len(match[2]):,} characters)", text)
    return BASE64_RUN.sub(lambda match: f"…({len(match[0]):,} characters of Base64)", text)


def one_line(message: str, secrets: tuple[str, ...] = (), room: int = LINE_CHARS) -> str:
    """A message as one line of at most room characters: secrets redacted, Base64 elided, cut."""
    text = " ".join(elide_base64(redact(message, secrets)).split())
    return text if len(text) <= room else text[: room - 1] + "…"


def visible(text: str) -> str:
    """text with each character a terminal would obey as a command, or would not show, as an
    escape (\\x1b, \\u202e)."""
    return CONTROL_CHARS.sub(
        lambda match: "\\x0d" if match[0] == "\r" else ascii(match[0])[1:-1], text
    )


def host_of(url: str) -> str:
    """host:port of a URL, without any user or password."""
    return urlsplit(url).netloc.rpartition("@")[2]


def shown_url(url: str) -> str:
    """url as chat.py displays it: a password in it becomes *** (in a malformed URL too)."""
    return re.sub(r"^([^:/?#]*://[^/?#@:]*:)[^/?#]*@", r"\1***@", url)


def check_base_url(url: str, source: str) -> str:
    """url, if it is a base URL that requests sends to the host chat.py sees in it (BASE_URL);
    anything else is a usage error naming where it came from."""
    import ipaddress

    match = BASE_URL.fullmatch(url)
    try:  # a bracketed host that is no IPv6 address raises ValueError
        if (
            match
            and len(match["host"]) <= 253
            and 0 < int(match["port"] or 1) < 65536
            and ipaddress.IPv6Address(match["ipv6"] or "::")
        ):
            return url
    except ValueError:
        pass
    raise UsageError(
        f"{source} must be a plain http:// or https:// URL with a valid host and port, "
        f"not '{shown_url(url)}'"
    )


class Spinner:
    """A stderr line counting the seconds waited, until stop() erases it."""

    def __init__(self, stream, color: bool):
        import threading

        self.stream, self.color, self.shown = stream, color, False
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.spin, daemon=True)
        self.thread.start()

    def spin(self) -> None:
        started, frame = time.monotonic(), 0
        while not self.stopping.wait(0.1):
            line = f"{SPINNER_FRAMES[frame % 4]} waiting {time.monotonic() - started:.0f} s"
            self.stream.write(ERASE_LINE + (f"{DIM}{line}{NORMAL}" if self.color else line))
            self.stream.flush()
            self.shown, frame = True, frame + 1

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()
        if self.shown:  # erased to the end of the line: a ^C the terminal echoed goes too
            self.stream.write(ERASE_LINE)
            self.stream.flush()


def console_obeys_escapes() -> bool:
    """Turn on virtual terminal processing for the Windows console on stderr, so that it acts on
    escape codes (older consoles cannot); returns whether it did."""
    try:
        import ctypes

        kernel32, mode = ctypes.windll.kernel32, ctypes.c_ulong()
        handle = kernel32.GetStdHandle(-12)  # STD_ERROR_HANDLE
        return bool(  # 0x0004: ENABLE_VIRTUAL_TERMINAL_PROCESSING
            kernel32.GetConsoleMode(handle, ctypes.byref(mode))
            and kernel32.SetConsoleMode(handle, mode.value | 0x0004)
        )
    except (ImportError, AttributeError, OSError):
        return False


class Env:
    """The process's surroundings: streams, terminal flags, environment, folder, how to read a line
    and wait. main() makes one of the process; tests make their own. What chat.py shows goes through
    here, control characters made visible on stderr, and on stdout when it is a terminal."""

    def __init__(
        self,
        stdin=None,
        stdout=None,
        stderr=None,
        environ: dict | None = None,
        cwd: str = ".",
        ttys: tuple[bool, bool, bool] = (False, False, False),
        read_line=input,
        sleep=time.sleep,
        raise_bugs: bool = False,
    ):
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr  # stdin binary (None: closed)
        self.environ, self.cwd = {} if environ is None else environ, cwd
        self.stdin_tty, self.stdout_tty, self.stderr_tty = ttys
        self.read_line, self.sleep = read_line, sleep
        self.raise_bugs = raise_bugs  # tests: a bug propagates with its traceback, not as exit 70
        self.secrets: tuple[str, ...] = ()  # redacted from every line: the key, a URL password
        self.configured: dict[str, str] = {}  # the settings file's, under ./.env's key and model
        self.spinner: Spinner | None = None
        self.styled = self.stderr_tty  # whether stderr obeys chat.py's styling and spinner
        # On a terminal, stderr's lines wait while a line of the reply is open on stdout.
        self.mid_line, self.held = False, []

    @classmethod
    def of_process(cls) -> Env:
        for fd in range(3):  # a parent may leave a pipe non-blocking: a read comes back empty
            try:
                os.set_blocking(fd, True)
            except (AttributeError, OSError):  # closed, or Windows before Python 3.12
                pass
        ttys = tuple(
            stream is not None and stream.isatty() for stream in (sys.stdin, sys.stdout, sys.stderr)
        )
        for stream, tty in zip((sys.stdout, sys.stderr), ttys[1:], strict=True):
            if hasattr(stream, "reconfigure"):  # a file or pipe gets UTF-8 whatever the locale's
                # encoding (Windows: cp1252); a terminal what it can show
                stream.reconfigure(encoding=None if tty else "utf-8", errors="replace")
        env = cls(
            getattr(sys.stdin, "buffer", None), sys.stdout, sys.stderr, os.environ, os.curdir, ttys
        )
        env.styled = env.styled and (not WINDOWS or console_obeys_escapes())
        return env

    def get(self, name: str) -> str:
        """An environment variable, else ./.env's or the settings file's (configured); empty and
        unset are the same."""
        return self.environ.get(name, "").strip() or self.configured.get(name, "")

    def path(self, name: str) -> str:
        """A file the user named, in the current folder. A name no file can have (a NUL, a lone
        surrogate that is no undecodable byte) is a usage error, not open()'s ValueError."""
        try:
            os.fsencode(name)
        except UnicodeError:
            pass
        else:
            if "\0" not in name:
                return os.path.join(self.cwd, name)
        raise UsageError(f"no file can be named {name!r}")

    @property
    def color(self) -> bool:
        return self.styled and not self.environ.get("NO_COLOR")

    def write(self, text: str) -> None:
        """Text for stdout: exactly as given into a pipe or file, made visible on a terminal."""
        self.stdout.write(visible(text) if self.stdout_tty else text)
        if self.stdout_tty and text:
            self.mid_line = not text.endswith("\n")
            if not self.mid_line:
                self.release()

    def release(self) -> None:
        """The stderr lines held back while a reply's line was open."""
        held, self.held, self.mid_line = self.held, [], False
        for line in held:
            self.say(line)

    def say(self, line: str) -> None:
        """One line on stderr, secrets redacted, control characters visible; a spinner goes on
        below."""
        if self.mid_line and self.stderr_tty:
            self.held.append(line)
            return
        spinning = self.stop_spinner()
        self.stderr.write(visible(redact(line, self.secrets)) + "\n")
        self.stderr.flush()
        if spinning:
            self.start_spinner()

    def warn(self, message: str, tail: str = "") -> None:
        """warning: MESSAGE, cut to fit one line, then the tail whole."""
        self.say(f"warning: {one_line(message, self.secrets, LINE_CHARS - 9 - len(tail))}{tail}")

    def error(self, exc: ChatError, hint: str = "") -> None:
        """error: MESSAGE HINT. The message is cut to fit one line; the hints stay whole."""
        hint = "".join(f" {part}" for part in (exc.hint, hint) if part)
        self.say(f"error: {one_line(str(exc), self.secrets, LINE_CHARS - 7 - len(hint))}{hint}")

    def start_spinner(self) -> None:
        if self.styled and not self.spinner:
            self.spinner = Spinner(self.stderr, self.color)

    def stop_spinner(self) -> bool:
        """Stop the spinner, if one runs; returns whether one did."""
        spinner, self.spinner = self.spinner, None
        if spinner:
            spinner.stop()
        return spinner is not None


# Plain classes and a namedtuple, not dataclasses: importing dataclasses (and with it inspect)
# would cost about a seventh of chat.py's start-up.


class Server(namedtuple("Server", "base_url key timeout retries model")):
    """Where requests go and how, and the model the settings name."""

    @property
    def host(self) -> str:
        return host_of(self.base_url)


class Settings:
    """What the user asked for besides the question: the body's fields and how to show the reply."""

    def __init__(
        self,
        model: str,
        system: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        reasoning_effort: str | None = None,
        options: list[tuple[str, object]] = (),
        schema: dict | None = None,
        stream: bool = False,
        usage: bool = False,
        show_reasoning: bool = False,
        verbose: bool = False,
    ):
        self.model, self.system, self.temperature = model, system, temperature
        self.max_tokens, self.reasoning_effort = max_tokens, reasoning_effort
        self.options, self.schema = options, schema
        self.stream, self.usage, self.show_reasoning, self.verbose = (
            stream,
            usage,
            show_reasoning,
            verbose,
        )


class Reply:
    """What the server answered; the text holds the tool calls too, as JSON lines."""

    def __init__(self, streamed: bool = False):
        self.text = self.reasoning = ""
        self.finish_reason = self.usage = self.model = None  # the model the server names
        self.choices = 1
        self.tool_calls: dict[int, dict] = {}  # index -> {"id", "name", "pieces" of the arguments}
        self.size = 0  # characters of text, reasoning and tool-call arguments held
        self.streamed, self.done = streamed, False  # done: the stream said [DONE]


class Conversation:
    """A conversation's turns so far, and the file the next one is appended to."""

    def __init__(self, folder: str, name: str, turns: list[dict] | None = None, save: bool = True):
        self.folder, self.name, self.turns, self.save = folder, name, turns or [], save

    @property
    def path(self) -> str:
        return os.path.join(self.folder, f"{self.name}.jsonl")


class Chat:
    """What every question of a run shares."""

    def __init__(
        self,
        env: Env,
        server: Server,
        settings: Settings,
        conversation: Conversation,
        session=None,
        interactive: bool = False,
    ):
        self.env, self.server, self.settings = env, server, settings
        self.conversation, self.session, self.interactive = conversation, session, interactive


# ------------------------------------------------------------------ builders


def drop_nones(mapping: dict) -> dict:
    return {key: value for key, value in mapping.items() if value is not None}


def is_openai_host(base_url: str) -> bool:
    """OpenAI's hosts and Azure's: they need a key and reject max_tokens."""
    host = urlsplit(base_url).hostname or ""
    return host == "api.openai.com" or host.endswith(
        (
            ".api.openai.com",
            ".openai.azure.com",
            ".cognitiveservices.azure.com",
            ".services.ai.azure.com",
        )
    )


def max_tokens_field(base_url: str) -> str:
    """OpenAI's hosts reject max_tokens for current models; other servers may only know it."""
    return "max_completion_tokens" if is_openai_host(base_url) else "max_tokens"


def api_url(base_url: str, path: str) -> str:
    """base_url + path; a query string in base_url (Azure's ?api-version=) stays at the end."""
    parts = urlsplit(base_url)
    return parts._replace(path=parts.path.rstrip("/") + path, fragment="").geturl()


def public_url(base_url: str) -> str:
    """base_url without user, password or query: what may be written to a file."""
    return f"{urlsplit(base_url).scheme}://{host_of(base_url)}{urlsplit(base_url).path}"


def is_loopback(host: str | None) -> bool:
    import ipaddress

    try:  # not *.localhost: such a name goes to the resolver, which may send it anywhere
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except (ValueError, AttributeError):  # a name, or None
        return False


def build_question(words: list[str], piped: str | None, files: list[str] = ()) -> str:
    """The question words, then piped text, then files, each part after a blank line."""
    question = " ".join(words).strip()
    # Keep the indentation of piped text's first line; drop blank lines around it.
    piped = (piped or "").rstrip().lstrip("\r\n")
    return "\n\n".join(part for part in (question, piped, *files) if part)


def open_input(path: str):
    """A file to read, binary; only a regular file: a FIFO (opened without waiting), a device or
    a folder is an OSError, at once."""
    file = open(os.open(path, nonblocking(os.O_RDONLY)), "rb")  # noqa: SIM115 (the caller's)
    if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
        file.close()
        raise OSError(0, "not a regular file")
    return file


def read_limited(file, source: str) -> bytes:
    """All of a file or stream up to MAX_INPUT bytes; beyond that a usage error, read no further."""
    data = file.read(MAX_INPUT + 1)
    if len(data) > MAX_INPUT:
        raise UsageError(
            f"{source} holds more than {MAX_INPUT // 2**20} MiB: chat.py reads no further",
            hint="(send a part of it)",
        )
    return data


def decode_utf8(data: bytes, source: str, env: Env) -> str:
    """Text as UTF-8; undecodable bytes are replaced, with a warning. A leading BOM is dropped."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        env.warn(
            f"{source} is not UTF-8 (byte {data[exc.start]:#04x} at offset {exc.start}); "
            "undecodable bytes were replaced with U+FFFD"
        )
        text = data.decode("utf-8", "replace")
    return text.removeprefix("\ufeff")


def read_piped_stdin(env: Env) -> str | None:
    """All of stdin as UTF-8; None on a terminal."""
    if env.stdin is None:  # started with stdin closed
        return ""
    return (
        None if env.stdin_tty else decode_utf8(read_limited(env.stdin, "piped stdin"), "stdin", env)
    )


def file_block(path: str, text: str) -> str:
    """The path, then the text in a code fence longer than any run of backticks inside it."""
    # A binary search for the shortest run not in text: a few passes over it, whatever it holds.
    low, high = 2, len(text) + 3  # fences: low is too short (or not), high long enough
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if "`" * middle in text else (low, middle)
    fence = "`" * high
    if text and not text.endswith("\n"):
        text += "\n"
    return f"{path}\n{fence}\n{text}{fence}"


def build_user_message(question: str, parts: list[dict]) -> dict:
    """The user message: plain text, or a text part followed by the attachments' parts."""
    content = [{"type": "text", "text": question}, *parts] if parts else question
    return {"role": "user", "content": content}


def build_messages(turns: list[dict], user_message: dict, system: str | None) -> list[dict]:
    """The messages of one request: the system prompt, the earlier turns, the new question."""
    messages = [{"role": "system", "content": system}] if system else []
    for turn in turns:
        messages += [turn["user"], {"role": "assistant", "content": turn["assistant"]}]
    return messages + [user_message]


def schema_format(schema: dict) -> dict:
    """OpenAI's response_format for a JSON Schema (taken by llama-server, vLLM, Ollama ...)."""
    title = schema.get("title")
    name = title if isinstance(title, str) and re.fullmatch(r"[\w-]{1,64}", title) else "reply"
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def json_object_fallback(body: dict, schema: dict | None) -> dict | None:
    """The request in the form llama-cpp-python takes --schema in; None without --schema or
    after -o."""
    if not schema or body.get("response_format") != schema_format(schema):
        return None
    return {**body, "response_format": {"type": "json_object", "schema": schema}}


def system_in_user(body: dict) -> dict | None:
    """The request with its system prompt put at the start of the first user message, for a
    chat template that refuses the system role; None when it has no system prompt."""
    messages = body.get("messages")
    if not (
        isinstance(messages, list)
        and len(messages) > 1
        and all(isinstance(message, dict) for message in messages[:2])
        and messages[0].get("role") == "system"
    ):
        return None
    system, first, *rest = messages
    content = first.get("content")
    content = (
        [{"type": "text", "text": system["content"]}, *content]
        if isinstance(content, list)
        else f"{system['content']}\n\n{content}"
    )
    return {**body, "messages": [{**first, "content": content}, *rest]}


def build_body(settings: Settings, messages: list[dict], base_url: str) -> dict:
    """The chat-completions request body, holding only the fields that were asked for."""
    body = drop_nones(
        {
            "model": settings.model,
            "messages": messages,
            "temperature": settings.temperature,
            max_tokens_field(base_url): settings.max_tokens,
            "reasoning_effort": settings.reasoning_effort,
            "response_format": schema_format(settings.schema) if settings.schema else None,
            "stream": True if settings.stream else None,
            # Only with -u: some servers reject the field.
            "stream_options": {"include_usage": True}
            if settings.stream and settings.usage
            else None,
        }
    )
    for key, value in settings.options:
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    level, depth = [body], 0  # breadth first, so that no depth overflows the stack
    while depth <= MAX_DEPTH and (
        level := [
            child
            for each in level
            if isinstance(each, (dict, list))
            for child in (each.values() if isinstance(each, dict) else each)
        ]
    ):
        depth += 1
    if depth > MAX_DEPTH:
        raise UsageError(
            f"the request nests deeper than {MAX_DEPTH} levels (from -o or a saved turn)"
        )
    try:
        json.dumps(body, allow_nan=False)  # requests would refuse it later, as a network failure
    except ValueError:
        raise UsageError(
            "the request holds NaN or Infinity (from -o or a saved turn), which JSON cannot carry"
        ) from None
    return body


def parse_options(pairs: list[list[str]]) -> list[tuple[str, object]]:
    """-o KEY VALUE pairs, VALUE as JSON when it parses (NaN is no JSON), else as text; a VALUE
    that starts like JSON but breaks is a usage error."""

    def refuse(constant: str):
        raise ValueError(f"{constant} is no JSON number")

    options = []
    for key, text in pairs:
        if key in ("messages", "stream"):
            raise UsageError(f"-o {key}: chat.py builds '{key}' itself")
        try:
            options.append((key, json.loads(text, parse_constant=refuse)))
        except (ValueError, RecursionError) as exc:
            if text.lstrip().startswith(("[", "{", '"')):
                raise UsageError(
                    f"-o {key} is not valid JSON: "
                    + (str(exc) if isinstance(exc, ValueError) else "it is nested too deeply"),
                    hint="(to send text that starts so, write it as a JSON string: '\"...\"')",
                ) from None
            options.append((key, text))
    return options


def short_schema(spec: str) -> dict:
    """The short form, "name, age int, bio: one sentence": an object with exactly those fields."""
    fields = {}
    for item in spec.split(","):
        head, _, description = item.partition(":")
        words = head.split()
        if not 1 <= len(words) <= 2 or not FIELD_NAME.fullmatch(words[0]):
            raise UsageError(
                f"--schema: {item.strip()!r} is not a field: write 'name', "
                "'name type' or 'name type: description'"
            )
        name, kind = words[0], words[1].lower() if len(words) == 2 else "str"
        if kind not in SHORT_TYPES:
            raise UsageError(
                f"--schema: {name} has the unknown type {kind!r}: use str, int, float or bool"
            )
        if name in fields:
            raise UsageError(f"--schema: the field {name} is named twice")
        fields[name] = drop_nones(
            {"type": SHORT_TYPES[kind], "description": description.strip() or None}
        )
    return {
        "type": "object",
        "properties": fields,
        "required": list(fields),
        "additionalProperties": False,
    }


def parse_schema(spec: str, env: Env) -> dict:
    """--schema SPEC as a JSON Schema: inline JSON, @file.json, or the short form."""
    text, option = spec, f"--schema {spec}" if spec.startswith("@") else "--schema"
    if spec.startswith("@"):
        try:
            with open_input(env.path(spec[1:])) as file:
                text = decode_utf8(read_limited(file, spec[1:]), spec[1:], env)
        except OSError as exc:
            raise UsageError(f"cannot read the schema {spec[1:]}: {exc.strerror or exc}") from None
    if not text.lstrip().startswith(("{", "[")):
        return short_schema(text)
    try:
        schema = json.loads(text)
    except (ValueError, RecursionError) as exc:
        why = exc if isinstance(exc, ValueError) else "it is nested too deeply"
        raise UsageError(f"{option} is not valid JSON: {why}") from None
    if not isinstance(schema, dict):
        raise UsageError(
            f"{option} must be a JSON Schema object, or fields such as 'name, age int'"
        )
    return schema


# ------------------------------------------------------------------ images


def fit_size(size: tuple[int, int], detail: str | None) -> tuple[int, int]:
    """The largest size, same aspect ratio, that keeps all the model sees at this detail."""
    width, height = size
    if detail == "original":
        return size
    if detail == "low":
        scale = min(1.0, LOW_DETAIL_BOX / width, LOW_DETAIL_BOX / height)
    else:
        scale = min(
            1.0,
            HIGH_DETAIL_LONG_SIDE / max(width, height),
            (HIGH_DETAIL_PIXELS / (width * height)) ** 0.5,
        )
    if scale >= 1.0:
        return size
    # The epsilon keeps 6000x4000 at exactly 1536x1024 despite float rounding;
    # it is far too small to push the product of two sides over the budget.
    return max(1, int(width * scale + 1e-6)), max(1, int(height * scale + 1e-6))


def why_not_as_is(image) -> str | None:
    """Why the file's own bytes cannot go as they are, or None when they can (if no larger)."""
    if image.format not in AS_IS_MODES:
        return f"{image.format} is not a format the API takes"
    if image.mode not in AS_IS_MODES[image.format]:
        return f"{image.mode} pixels are converted"
    if getattr(image, "is_animated", False):
        return "the first frame of an animation"
    if image.getexif().get(0x0112, 1) != 1:
        return "turned upright from its EXIF orientation"
    return None


def shrink_image(image, detail: str | None):
    """Downscale (never upscale) to fit_size, before anything else decodes it (a PNG's getexif()
    would). fit_size is the same whichever way EXIF turns the image."""
    from PIL import Image

    target = fit_size(image.size, detail)
    if target != image.size:
        image.draft(None, target)  # JPEG: decode at 1/2, 1/4 or 1/8 when that still covers it
    # Pillow holds a pixel in 1 byte, or in 4 for every mode of more bands or bits (I;16: 2);
    # a palette image is sent as RGB or RGBA, 4 bytes a pixel. libwebp decodes into buffers of
    # its own besides (a 33-megapixel WebP peaked at 850 MB): a WebP pixel counts twice.
    held = (1 if image.mode in ("1", "L") else 4) * (2 if image.format == "WEBP" else 1)
    if image.width * image.height * held > MAX_DECODED:
        raise Image.DecompressionBombError(f"{image.width}x{image.height} {image.mode}")
    return image.resize(target, Image.Resampling.BICUBIC) if target != image.size else image


def encode_image(image) -> tuple[str, bytes]:
    """Encode as JPEG, or as PNG when some pixel is transparent."""
    import io

    buffer = io.BytesIO()
    if ("A" in image.getbands() or "transparency" in image.info) and (
        image.convert("RGBA").getchannel("A").getextrema()[0] < 255
    ):
        image.convert("RGBA").save(buffer, "PNG")
        return "image/png", buffer.getvalue()
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        # Pillow's convert("L") clips 16-bit values at 255 instead of scaling them.
        image = image.convert("I")
        if image.getextrema()[1] > 255:
            image = image.point(lambda value: value * (1 / 256))
    if image.mode not in ("RGB", "L"):
        image = image.convert("L" if image.mode in ("1", "I") else "RGB")
    image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return "image/jpeg", buffer.getvalue()


def encode_image_file(path: str, detail: str | None, env: Env) -> tuple[str, str]:
    """A local image as a data: URL, shrunk or as it is, and a note for -v saying which and why."""
    import base64
    import warnings

    from PIL import Image, ImageOps

    full_path = env.path(path)
    try:
        with warnings.catch_warnings(record=True) as caught:  # Pillow's: corrupt EXIF ...
            warnings.simplefilter("always")
            # Pillow only warns between 89 and 179 megapixels; any of those is a bomb to us.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Only the raster formats Pillow decodes itself: for EPS it would run Ghostscript.
            formats = PART_KINDS["image_url"].formats.upper().split(", ")
            with open_input(full_path) as file, Image.open(file, formats=formats) as image:
                source = f"{image.width}x{image.height} {image.format} {image.mode}"
                prepared = ImageOps.exif_transpose(shrink_image(image, detail))
                kind, reason = image.format, why_not_as_is(image)
                mime, data = encode_image(prepared)
                size = os.fstat(file.fileno()).st_size
                file.seek(0)
                original = file.read() if reason is None and size <= len(data) else None
    except Image.UnidentifiedImageError:
        raise UsageError(
            f"cannot decode image {path}: not an image chat.py can send "
            f"({PART_KINDS['image_url'].formats})"
        ) from None
    except OSError as exc:
        if exc.strerror:  # the file itself: missing, a directory, no permission
            raise UsageError(f"cannot read image {path}: {exc.strerror}") from None
        raise UsageError(f"cannot decode image {path}: {exc}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UsageError(
            f"image {path} is too large (over {Image.MAX_IMAGE_PIXELS:,} pixels, or "
            f"{MAX_DECODED // 2**20} MiB decoded)"
        ) from None
    except Exception as exc:  # noqa: BLE001 (Pillow's decoders raise many types on damaged files)
        raise UsageError(f"cannot decode image {path}: {exc}") from None
    for warning in caught:
        env.warn(f"image {path}: {warning.message}")
    if original is not None:
        sent = f"sent as it is (re-encoded it would take {len(data):,} bytes)"
        mime, data = Image.MIME[kind], original
    else:
        sent = (
            f"sent {prepared.width}x{prepared.height} {mime.split('/')[1].upper()}, "
            f"{len(data):,} bytes ({reason or 'smaller than the file'})"
        )
    note = f"image {path}: {source}, {size:,} bytes; {sent}"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}", note


def read_attachment(
    source: str, detail: str | None, env: Env, image: bool = False
) -> tuple[str | dict, str]:
    """What -f SOURCE (image=True: --image) adds to the question, judged by the file's content:
    a text block (str) or a content part (dict); and a note for -v."""
    import base64

    if image:  # a URL goes as given, a file inline
        url, note = (
            (source, f"image {elide_base64(source)}: sent as given")
            if source.startswith(("http://", "https://", "data:"))
            else encode_image_file(source, detail, env)
        )
        return {"type": "image_url", "image_url": drop_nones({"url": url, "detail": detail})}, note
    try:
        with open_input(env.path(source)) as file:
            data = read_limited(file, source)
    except OSError as exc:
        raise UsageError(f"cannot read file {source}: {exc.strerror or exc}") from None
    start = data[:TEXT_SNIFF_BYTES]
    kind = next(
        (kind for kind, row in PART_KINDS.items() if re.match(row.magic, start, re.DOTALL)), ""
    )
    if not kind:
        sendable = [
            f"{row.noun} ({row.formats})" if row.formats else row.noun
            for kind, row in PART_KINDS.items()
            if kind != "text"
        ]
        raise UsageError(
            f"cannot add {source}: it is not text (it holds NUL bytes) and not one of the files "
            f"chat.py can send: {', '.join(sendable)}"
        )
    if kind == "image_url":
        return read_attachment(source, detail, env, image=True)
    note = f"{PART_KINDS[kind].word} {source}: {len(data):,} bytes"
    if kind == "text":
        return file_block(source, decode_utf8(data, source, env)), f"{note}; inline in the question"
    value = PART_KINDS[kind].value(source, data, base64.b64encode(data).decode("ascii"))
    return {"type": kind, kind: value}, f"{note}; sent as it is ({kind} part)"


def split_attached(attached: list[tuple]) -> tuple[list[str], list[dict], list[str]]:
    """The text blocks, the content parts and the parts' sources in (source, attachment, note)s."""
    return (
        [item for _, item, _ in attached if isinstance(item, str)],
        [item for _, item, _ in attached if isinstance(item, dict)],
        [source for source, item, _ in attached if isinstance(item, dict)],
    )


# ----------------------------------------------------------------- transport


def bearer_auth(key: str):
    """The key as a Bearer token, or nothing: unlike headers=, auth= is not replaced by ~/.netrc."""

    def add_authorization(request):
        if key:
            request.headers["Authorization"] = f"Bearer {key}"
        return request

    return add_authorization


def refuse_other_origins(response, **_) -> None:
    """A response hook: a redirect is followed only to the same scheme, host and port."""
    from urllib.parse import urljoin

    def origin(url: str) -> tuple:
        parts = urlsplit(url)
        return (
            parts.scheme,
            parts.hostname,
            parts.port or {"http": 80, "https": 443}.get(parts.scheme),
        )

    if response.is_redirect:
        response.close()  # its body is not needed; requests fails badly reading a broken one
        location = response.headers["location"]
        try:  # the header's bytes as UTF-8, as requests reads them to follow it
            target = urljoin(response.url, location.encode("latin-1").decode())
            elsewhere = origin(target) != origin(response.url)
        except ValueError:  # http://[::1, a port that is no number, not UTF-8, a fullwidth @
            raise ApiError(
                f"the server redirected the request to an address that is not a URL: {location}"
            ) from None
        if elsewhere:
            raise ApiError(
                f"the server redirected the request to {shown_url(target)}; chat.py "
                f"follows redirects only within {host_of(response.url)}"
            )


def mask_key(key: str) -> str:
    """What the verbose trace shows of a key: its sk- prefix and at most the last 4 characters."""
    return ("sk-" if key.startswith("sk-") else "") + "…" + (key[-4:] if len(key) >= 16 else "")


def cut_strings(value, key: str = ""):
    """A copy of a JSON value with Base64 elided and each long string cut to its start."""
    if isinstance(value, dict):
        return {name: cut_strings(item, name) for name, item in value.items()}
    if isinstance(value, list):
        return [cut_strings(item) for item in value]
    if key == "data" and isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9+/]+=*", value):
        return f"…({len(value):,} characters of Base64)"  # input_audio's, however short
    if isinstance(value, str):
        value = elide_base64(value)
        if len(value) > TRACE_STRING_CHARS:
            return value[:TRACE_STRING_CHARS] + f"…({len(value):,} characters)"
    return value


def pretty_body(body: bytes | str) -> str:
    """A body for the trace: JSON indented, Base64 cut to its length, long strings cut."""
    try:
        return json.dumps(cut_strings(json.loads(body)), indent=2, ensure_ascii=False)
    except (ValueError, RecursionError):
        text = elide_base64(body.decode("utf-8", "replace") if isinstance(body, bytes) else body)
        if len(text) > TRACE_TEXT_CHARS:
            text = text[:TRACE_TEXT_CHARS] + f"…({len(text):,} characters)"
        return text


class Trace:
    """The -v trace of each HTTP exchange, on stderr, in the style of curl -v."""

    def __init__(self, env: Env, key: str):
        self.env, self.key, self.started = env, key, time.perf_counter()

    def write(self, prefix: str, text: str) -> None:
        for line in re.split(r"\r?\n", text):  # not splitlines(): a lone \r or \x85 is shown
            self.env.say(prefix + line)

    def exchange(self, response) -> None:
        """The request as sent, then the response's status line and headers."""
        request, url = response.request, urlsplit(response.request.url)
        path = url.path + (f"?{url.query}" if url.query else "")
        self.write("> ", f"{request.method} {path} HTTP/1.1\nHost: {host_of(request.url)}")
        for name, value in request.headers.items():
            if name.lower() == "authorization":
                value = f"Bearer {mask_key(self.key)}" if value.startswith("Bearer ") else "[...]"
            self.write("> ", f"{name}: {value}")
        self.write("> ", "")
        if request.body:
            self.write("> ", pretty_body(request.body))
        version = {10: "1.0", 11: "1.1", 20: "2"}.get(response.raw.version, "1.1")
        self.write("< ", f"HTTP/{version} {response.status_code} {response.reason}")
        for name, value in response.headers.items():
            cookie = name.lower() == "set-cookie"
            self.write("< ", f"{name}: {value.split('=', 1)[0] + '=…' if cookie else value}")
        self.write("< ", "")
        self.write("* ", f"time to first byte: {response.elapsed.total_seconds():.3f} s")

    def body(self, data: bytes) -> None:
        if data:
            self.write("< ", pretty_body(data))

    def sse_line(self, line: str) -> None:
        self.env.say(f"| {elide_base64(line)}")

    def summary(self, usage: dict | None) -> None:
        self.write("* ", f"total time: {time.perf_counter() - self.started:.3f} s")
        if isinstance(usage, dict):
            counts = ", ".join(
                f"{name} {value}" for name, value in usage.items() if isinstance(value, int)
            )
            self.write("* ", f"tokens: {counts}")


def innermost(exc: BaseException) -> BaseException:
    """Follow requests' and urllib3's wrapping (args[0], .reason, __cause__) to the original error:
    http.client's own, whose context is only how it found out (int() of a bad status line)."""
    import http.client

    seen = set()
    while id(exc) not in seen and not isinstance(exc, http.client.HTTPException):
        seen.add(id(exc))
        wrapped = (getattr(exc, "reason", None), *exc.args[:1], exc.__cause__, exc.__context__)
        inner = next((each for each in wrapped if isinstance(each, BaseException)), None)
        if inner is None:
            break
        exc = inner
    return exc


def chat_error(exc: Exception, server: Server) -> ChatError:
    """What a failure of requests or urllib3 means, told in words: Python's own never reach the
    line. Not worth a retry: a read timeout (the server has the request), a host that DNS says
    does not exist, and https:// to a server that does not answer in TLS."""
    import http.client
    import socket
    import ssl
    import traceback

    import requests
    import urllib3

    errors, host, inner = urllib3.exceptions, server.host, innermost(exc)
    said = f": {inner.strerror}" if isinstance(inner, OSError) and inner.strerror else ""
    connect_timeout = min(CONNECT_TIMEOUT, server.timeout)
    reason = str(getattr(inner, "reason", None) or "")  # an SSLError's: WRONG_VERSION_NUMBER ...
    in_handshake = any(  # the TLS handshake, before any HTTP was sent
        frame.f_code.co_name == "do_handshake"
        for frame, _ in traceback.walk_tb(inner.__traceback__)
    )
    if in_handshake and not (
        isinstance(inner, ssl.SSLCertVerificationError) or "ALERT" in reason
    ):  # no certificate, no TLS alert: the server's answer (or silence) is not TLS
        waited = f" within {connect_timeout:g} s" if isinstance(inner, TimeoutError) else ""
        return NetworkError(
            f"{host} did not answer in TLS{waited}: is it a plain-HTTP server? try "
            + shown_url(server.base_url.replace("https://", "http://", 1))
        )
    if isinstance(exc, requests.ConnectTimeout):
        return TimedOut(f"could not connect to {host} within {connect_timeout:g} s", retryable=True)
    if isinstance(exc, (requests.Timeout, errors.ReadTimeoutError)) or isinstance(
        inner, errors.ReadTimeoutError
    ):
        return TimedOut(f"{host} did not answer within {server.timeout:g} s (--timeout)")
    if isinstance(exc, requests.exceptions.InvalidSchema) and "SOCKS" in str(exc):
        return UsageError(
            "a socks5:// proxy is set in the environment (ALL_PROXY, HTTPS_PROXY), "
            "but PySocks is not installed",
            hint="(pip install 'requests[socks]')",
        )
    if isinstance(exc, (requests.exceptions.SSLError, errors.SSLError)):
        why = getattr(inner, "verify_message", None) or reason.replace("_", " ").lower()
        return NetworkError(f"TLS failure talking to {host}" + (f": {why}" if why else ""))
    if isinstance(inner, http.client.HTTPException) and not isinstance(
        inner, (ConnectionError, http.client.IncompleteRead)
    ):
        return ApiError(f"{host} did not answer in HTTP: {str(inner)!r}")
    if isinstance(inner, http.client.RemoteDisconnected):
        return NetworkError(f"{host} closed the connection without answering", retryable=True)
    if isinstance(exc, (requests.exceptions.ChunkedEncodingError, errors.ProtocolError)):
        return NetworkError(f"the connection to {host} broke off mid-reply{said}", retryable=True)
    if isinstance(exc, (requests.exceptions.ContentDecodingError, errors.DecodeError)):
        return ApiError(f"cannot decode the reply from {host}: its compressed body is damaged")
    if isinstance(exc, requests.TooManyRedirects):
        return ApiError(f"too many redirects from {host}")
    if isinstance(inner, socket.gaierror):
        # EAI_NODATA is Linux's "no address for this name"; other systems do without it.
        absent = inner.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None))
        return NetworkError(f"cannot resolve host {host}{said}", retryable=not absent)
    if isinstance(exc, requests.ConnectionError):
        return NetworkError(f"cannot reach {host}{said}", retryable=True)
    return NetworkError(f"request to {host} failed{said}")


def within(seconds: float, call, *args, **kwargs):
    """call(*args, **kwargs), made to raise TooSlow after seconds where there is an alarm (not on
    Windows; send() sets its handler): each socket read may wait the timeout, not their sum."""
    if not hasattr(signal, "setitimer"):
        return call(*args, **kwargs)
    try:  # armed inside: a Ctrl-C as it is set must not leave it armed
        signal.setitimer(signal.ITIMER_REAL, seconds)
        return call(*args, **kwargs)
    finally:  # before the caller's handlers, so that the alarm cannot go off in them
        signal.setitimer(signal.ITIMER_REAL, 0)


def iter_body(response, server: Server):
    """The body's bytes as they arrive, decompressed, READ_SIZE at most at a time (urllib3 read
    directly: iter_content(chunk_size=None) waits for the whole of a body that is not chunked),
    a chunked one a chunk at a time where there is an alarm (read1 hands over parts of chunks
    too, at three times the cost). A chunk trickled byte by byte, or compressed bytes that
    decode to nothing, would keep a read going for ever: the alarm ends each at twice the
    timeout."""
    import urllib3

    raw = response.raw
    reads = (  # urllib3 before 2.3 has no read1: its stream() waits for READ_SIZE bytes
        raw.stream(READ_SIZE, decode_content=True)
        if not hasattr(raw, "read1") or (raw.chunked and hasattr(signal, "setitimer"))
        else iter(lambda: raw.read1(READ_SIZE, decode_content=True), b"")
    )
    try:  # twice: a read that waits in silence is the read timeout's to end, and to tell
        while chunk := within(2 * server.timeout, next, reads, b""):
            yield chunk
    except TooSlow:
        raise TimedOut(
            f"{server.host} sent a part of its reply too slowly: not whole after "
            f"{2 * server.timeout:g} s (--timeout)"
        ) from None
    except urllib3.exceptions.HTTPError as exc:
        raise chat_error(exc, server) from None


def read_body(response, server: Server, limit: int = MAX_REPLY) -> bytes:
    """The whole body up to limit bytes: more is an error, but an error body is cut there. It
    must be whole within the timeout: each read's own timeout does not stop a trickle."""
    chunks, size, started = [], 0, time.monotonic()
    try:
        for chunk in iter_body(response, server):
            chunks.append(chunk)
            size += len(chunk)
            if time.monotonic() - started > server.timeout:
                raise TimedOut(
                    f"{server.host} sent its reply too slowly: not whole after "
                    f"{server.timeout:g} s (--timeout)"
                )
            if size > limit and limit != MAX_ERROR_BODY:
                raise ApiError(
                    f"the reply from {server.host} is larger than {limit // 2**20} MiB; "
                    "chat.py reads no further"
                )
            if size > limit:
                break
    finally:
        response.close()
    return b"".join(chunks)[:limit]


def text_snippet(data: bytes | str) -> str:
    """The start of a body that is not the JSON expected, without HTML markup."""
    text = data[: 64 * 1024]
    text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    title = re.search(
        r"<title[^>]*>([^<]*)</title>", text, re.IGNORECASE
    )  # linear: no .*? to the end
    text = re.sub(
        r"<(script|style)\b.*?</\1>|<[^>]*>",
        " ",
        title[1] if title else text,
        flags=re.IGNORECASE | re.DOTALL,
    )
    return " ".join(text.split())


def error_message(payload, depth: int = 0) -> str:
    """The message in an error body of any provider's shape, arrays (Gemini) and FastAPI's included;
    nothing deeper than any provider nests one."""
    if isinstance(payload, str):
        return payload
    if depth > 8:
        return ""
    if isinstance(payload, list):
        return "; ".join(filter(None, (error_message(item, depth + 1) for item in payload[:5])))
    if isinstance(payload, dict) and isinstance(payload.get("loc"), list):
        return (
            f"{'.'.join(map(str, payload['loc']))}: {error_message(payload.get('msg'), depth + 1)}"
        )
    for field in ("error", "message", "detail", "msg") if isinstance(payload, dict) else ():
        if message := error_message(payload.get(field), depth + 1):
            return message
    return ""


def parse_retry_after(headers, now: float | None = None) -> float | None:
    """Seconds the server asks us to wait (retry-after-ms, else Retry-After), or None."""
    import email.utils

    for name, per_second in (("retry-after-ms", 1000), ("retry-after", 1)):
        try:
            seconds = float(headers.get(name) or "") / per_second
        except ValueError:
            continue
        if math.isfinite(seconds):
            return max(0.0, seconds)
    try:
        when = email.utils.parsedate_to_datetime(headers.get("retry-after") or "").timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def clock_after(seconds: float) -> str:
    """The local time `seconds` from now, as a clock shows it (with the date when not today)."""
    when = time.localtime(
        time.time() + min(seconds, 10**9)
    )  # localtime() overflows on absurd waits
    return time.strftime("%Y-%m-%d %H:%M:%S" if seconds > 12 * 3600 else "%H:%M:%S", when)


def api_error(response, body: bytes) -> ApiError:
    """An ApiError for an HTTP error status: what the server said, whether and when to retry."""
    code, text = response.status_code, body.decode("utf-8", "replace")
    status = f"HTTP {code} {response.reason}".strip()
    try:
        message = error_message(json.loads(body))
    except (ValueError, RecursionError):
        message = ""
    cannot_work = bool(message and REQUEST_CANNOT_WORK.search(text))  # said in JSON
    message = message or text_snippet(body)
    message = (
        f"{status}: {message}" if message and message.lower() not in status.lower() else status
    )
    overflow = bool(CONTEXT_OVERFLOW.search(text))
    details = {"brief": f"HTTP {code}", "overflow": overflow}
    if "insufficient_quota" in text:
        return ApiError(
            message,
            code,
            hint="(the account is out of quota: add credit, retrying will not help)",
            **details,
        )
    hint, url = "", urlsplit(response.url)
    if code == 404:  # say where the request went, and what to check
        advice = (
            f"the base URL has no path; try --base-url {shown_url(f'{url.scheme}://{url.netloc}/v1')}"
            if url.path in ("/chat/completions", "/models")
            else "this server lists no models"
            if url.path.endswith("/models")
            else "check --base-url, and --model against what python chat.py --models lists"
        )
        where = one_line(shown_url(response.url), room=120)  # a redirect may have made it long
        hint = f"({response.request.method} {where}: {advice})"
    should_retry = response.headers.get("x-should-retry", "").lower()
    retryable = (
        should_retry == "true"
        if should_retry in ("true", "false")
        else code in RETRY_STATUSES or (code >= 500 and not (overflow or cannot_work))
    )
    wait = parse_retry_after(response.headers)
    if retryable and wait is not None and wait > MAX_RETRY_AFTER:
        seconds = f"{wait:.0f}" if wait < 1e15 else f"{wait:.0e}"  # 1e308 has 309 digits
        hint = f"(the server asks to wait {seconds} s: try again after {clock_after(wait)})"
        retryable = False
    return ApiError(message, code, hint=hint, retryable=retryable, retry_after=wait, **details)


def backoff_delay(attempt: int, rand=None) -> float:
    """INITIAL_RETRY_DELAY doubled for each retry so far, at most MAX_RETRY_DELAY, times a random
    factor in [0.75, 1]."""
    import random

    return min(INITIAL_RETRY_DELAY * 2**attempt, MAX_RETRY_DELAY) * (
        1 - 0.25 * (rand or random.random)()
    )


def retry_wait(error: ChatError, attempt: int, retries: int) -> float | None:
    """Seconds to wait before retrying after error, or None to give up."""
    if attempt >= retries or not error.retryable:
        return None
    return error.retry_after if error.retry_after is not None else backoff_delay(attempt)


def send(session, server: Server, path: str, body: dict | None, trace: Trace | None):
    """One HTTP exchange (POST with a body, else GET), up to a response with a status below 400.
    Each read waits at most the timeout; so that a trickle cannot draw out the status line and
    headers, an alarm bounds them all where there is one (not on Windows)."""
    import requests

    if hasattr(signal, "SIGALRM"):  # within()'s alarm, for the body's reads too
        signal.signal(signal.SIGALRM, raise_too_slow)
    connect_timeout = min(CONNECT_TIMEOUT, server.timeout)
    deadline = connect_timeout + server.timeout
    try:
        response = within(
            deadline,
            session.request,
            "GET" if body is None else "POST",
            api_url(server.base_url, path),
            json=body,
            headers={"User-Agent": USER_AGENT},
            # without a key, a user and password in the base URL go as Basic auth, as in curl
            auth=None
            if not server.key and urlsplit(server.base_url).username
            else bearer_auth(server.key),
            timeout=(connect_timeout, server.timeout),
            stream=True,  # return at the headers; the caller reads the body
            hooks={"response": refuse_other_origins},
        )
    except TooSlow:
        raise TimedOut(
            f"{server.host} sent its status line and headers too slowly: not whole after "
            f"{deadline:g} s (--timeout)"
        ) from None
    except requests.RequestException as exc:
        raise chat_error(exc, server) from None
    if trace:
        trace.exchange(response)
    if response.status_code >= 400:
        error_body = read_body(response, server, MAX_ERROR_BODY)
        if trace:
            trace.body(error_body)
        raise api_error(response, error_body)
    return response


def send_with_retries(
    session,
    server: Server,
    path: str,
    body: dict | None,
    read,
    env: Env,
    trace: Trace | None = None,
    fallbacks=(),
):
    """Send body and return read(response, streamed), retrying what a retry can fix; streamed
    is what the body is, whatever was asked. Each fallback (pattern, make_body, note) goes once,
    before any retry: when a server's refusal matches pattern, make_body(body) is sent instead."""
    attempt, rejected = 0, {}  # the fallbacks sent, with the refusal that sent each
    while True:
        try:
            response = send(session, server, path, body, trace)
            content_type = response.headers.get("Content-Type", "")
            streamed = "text/event-stream" in content_type or (
                bool(body and body.get("stream")) and "json" not in content_type
            )
            return read(response, streamed)
        except ChatError as error:
            refusal = str(error) if isinstance(error, ApiError) and error.status else ""
            fallback = next((each for each in fallbacks if each[0].search(refusal)), None)
            if fallback in rejected:
                raise rejected[fallback] from None  # its message explains what the first asked
            if fallback and (new_body := fallback[1](body)):
                if trace:
                    trace.write("* ", fallback[2])
                body, rejected[fallback] = new_body, error
                continue
            wait = retry_wait(error, attempt, server.retries)
            if wait is None:
                raise
            attempt += 1
            env.warn(
                f"{error.brief}; retrying in {wait:.1f} s ({attempt + 1} of {server.retries + 1})"
            )
            env.sleep(wait)


def refusal_hint(message: str, body: dict) -> str:
    """Advice for a server's refusal of what the request holds: function tools with reasoning
    (OpenAI), or a kind of content part; "" when there is none."""
    if TOOLS_WITH_REASONING.search(message):
        return (
            "(for -o tools on /chat/completions add --reasoning-effort none, "
            "or use the Responses API)"
        )
    sent = {
        part.get("type")
        for entry in body["messages"]
        if isinstance(entry.get("content"), list)
        for part in entry["content"]
        if isinstance(part, dict) and isinstance(part.get("type"), str)
    }
    kinds = [kind for kind, row in PART_KINDS.items() if row.refused and kind in sent]
    named = [kind for kind in kinds if re.search(PART_KINDS[kind].refused, message, re.IGNORECASE)]
    named = named or (kinds if PART_REFUSED.search(message) else [])
    return (
        f"(this server may not take {' or '.join(PART_KINDS[kind].noun for kind in named)})"
        if named
        else ""
    )


# ------------------------------------------------------------ replies and output


def message_text(content) -> str | None:
    """Text from a message's content: a string, or a list of text parts."""
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return content if isinstance(content, str) else None


def split_parts(parts: list) -> tuple[str, str]:
    """The text and the reasoning in a list of parts (REPLY_PARTS; an untyped part is text)."""
    found = {False: [], True: []}
    for part in parts:
        kind = part.get("type", "text") if isinstance(part, dict) else None
        key, is_reasoning = REPLY_PARTS.get(kind if isinstance(kind, str) else "", (None, False))
        value = part.get(key) if key else None
        value = message_text(value) if isinstance(value, list) else value
        if isinstance(value, str):
            found[is_reasoning].append(value)
    return "".join(found[False]), "".join(found[True])


def split_message(message: dict) -> tuple[str | None, str]:
    """The text (None when there is no content nor refusal) and the reasoning of a message or a
    stream delta, in every shape (REASONING_FIELDS, REPLY_PARTS)."""
    content = message.get("content")
    text, thinking = split_parts(content) if isinstance(content, list) else (content, "")
    text = text if isinstance(text, str) else None
    if not text and isinstance(message.get("refusal"), str):
        text = message["refusal"]
    for name in REASONING_FIELDS:
        value = message.get(name)
        value = split_parts(value)[1] if isinstance(value, list) else value
        if value and isinstance(value, str):
            return text, value
    return text, thinking


class ThinkBlock:
    """Splits a <think>...</think> block at the very start of a reply's text (after whitespace)
    off as reasoning, the text given whole or in pieces cut anywhere; what may be a tag cut in two
    waits for the next piece. A block never closed is reasoning to the end."""

    def __init__(self):
        self.state, self.held = "start", ""  # start, think, after (the block), text

    def split(self, piece: str, last: bool = False) -> tuple[str, str]:
        """The (text, reasoning) known with piece; last: the reply ends here."""
        if self.state == "text":
            return piece, ""
        held, self.held, reasoning = self.held + piece, "", ""
        if self.state == "start":
            start = held.lstrip()
            if THINK_OPEN.startswith(start) and not last:
                self.held = held
                return "", ""
            if not start.startswith(THINK_OPEN):
                self.state = "text"
                return held, ""
            self.state, held = "think", start[len(THINK_OPEN) :]
        if self.state == "think":
            reasoning, closed, held = held.partition(THINK_CLOSE)
            if not closed:
                cut = len(reasoning) - max(
                    n for n in range(len(THINK_CLOSE)) if reasoning.endswith(THINK_CLOSE[:n])
                )
                self.held = "" if last else reasoning[cut:]
                return "", reasoning if last else reasoning[:cut]
            self.state = "after"
        held = held.lstrip()  # the answer starts after the block's closing whitespace
        if held:
            self.state = "text"
        return held, reasoning


def add_tool_calls(calls: dict[int, dict], items) -> int:
    """Merge tool calls, or pieces of them, into calls by index (else a name or new id starts one
    after the last one begun); returns the characters added. Past MAX_TOOL_CALLS, an error."""
    added = 0
    for item in items if isinstance(items, list) else []:
        function = item.get("function") if isinstance(item, dict) else None
        if not isinstance(function, dict):
            continue
        index, last = item.get("index"), next(reversed(calls), -1)
        if not isinstance(index, int):
            starts = (
                last < 0 or function.get("name") or item.get("id") not in (None, calls[last]["id"])
            )
            index = last + 1 if starts else last
        if index not in calls:
            if len(calls) == MAX_TOOL_CALLS:
                raise ApiError(
                    f"the reply holds more than {MAX_TOOL_CALLS:,} tool calls; chat.py reads no "
                    "further"
                )
            call_id = item.get("id") if isinstance(item.get("id"), str) else None
            calls[index] = {"id": call_id, "name": "", "pieces": []}
            added += len(call_id or "")
        call = calls[index]
        name, arguments = function.get("name"), function.get("arguments")
        if isinstance(name, str) and not call["name"]:
            call["name"] = name
            added += len(name)
        if arguments is not None:
            piece = (
                arguments if isinstance(arguments, str) else json.dumps(arguments)
            )  # sent parsed
            call["pieces"].append(piece)
            added += len(piece)
    return added


def tool_call_lines(calls: dict[int, dict]) -> str:
    """One JSON line per tool call, {"name": ..., "arguments": ...}, the arguments parsed."""
    lines = []
    for _, call in sorted(calls.items()):
        as_sent = {"name": call["name"], "arguments": "".join(call["pieces"])}
        try:  # as text when they are no JSON (NaN is not), or nest too deep to be written again
            parsed = {**as_sent, "arguments": json.loads(as_sent["arguments"])}
            lines.append(json.dumps(parsed, ensure_ascii=False, allow_nan=False) + "\n")
        except (ValueError, RecursionError):
            lines.append(json.dumps(as_sent, ensure_ascii=False) + "\n")
    return "".join(lines)


def after_text(text: str, calls: str) -> str:
    """What follows text so that tool-call lines start on a line of their own."""
    return ("\n" if calls and text and not text.endswith("\n") else "") + calls


def read_json(response, server: Server, trace: Trace | None):
    """A whole reply's JSON (deep nesting is not JSON here either)."""
    data = read_body(response, server)
    if trace:
        trace.body(data)
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise ApiError(f"the server's reply is not JSON: {text_snippet(data)!r}") from None


def read_reply(response, server: Server, trace: Trace | None) -> Reply:
    """The reply of a non-streamed completion."""
    payload = read_json(response, server, trace)
    if not isinstance(payload, dict):
        raise ApiError("unexpected reply from the server: not a JSON object")
    if "error" in payload and "choices" not in payload:
        raise ApiError(
            f"the server reported an error: {error_message(payload) or json.dumps(payload)}"
        )
    choices = payload.get("choices")
    first = choices[0] if isinstance(choices, list) and choices else None
    message = first.get("message") if isinstance(first, dict) else None
    if not isinstance(message, dict):
        raise ApiError("unexpected reply from the server: no choices")
    reply = Reply()
    reply.choices, reply.finish_reason = len(choices), first.get("finish_reason")
    reply.usage = payload.get("usage")
    reply.model = payload.get("model") if isinstance(payload.get("model"), str) else None
    add_tool_calls(reply.tool_calls, message.get("tool_calls"))
    text, reasoning = split_message(message)
    if text is None and not reply.tool_calls and reply.finish_reason != "length":
        raise ApiError("unexpected reply from the server: the message has no text")
    text, thought = ThinkBlock().split(text or "", last=True)
    reply.text = text + after_text(text, tool_call_lines(reply.tool_calls))
    reply.reasoning = reasoning + thought
    return reply


def read_models(response, server: Server, trace: Trace | None) -> list[str]:
    """The model ids of a GET /models reply, sorted."""
    payload = read_json(response, server, trace)
    models = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(models, list):
        raise ApiError("unexpected reply from the server: no list of models ('data')")
    return sorted(
        model["id"]
        for model in models
        if isinstance(model, dict) and isinstance(model.get("id"), str)
    )


class SSEDecoder:
    """A Server-Sent Events parser (WHATWG HTML, "Server-sent events"), fed bytes as they arrive.

    Lines end with CRLF, LF or CR; a blank line dispatches the event; a line starting with ":"
    is a comment; "field: value" loses one space after the colon; several data lines join with
    "\\n"; an event cut off by the end of the stream is dropped. Lines are split as bytes before
    decoding, so a character split across reads stays whole, and U+2028 inside the JSON is no
    line break. A line still open is kept in pieces, joined once it ends, so a long line costs
    time in proportion to its length; a line or an event over MAX_REPLY bytes is an error.
    """

    def __init__(self, on_line=None):
        self.on_line = on_line  # called with each raw line, for the -v trace
        self.pending: list[bytes] = []  # the pieces of a line not yet ended
        self.pending_size = self.data_size = 0
        self.started = self.after_cr = False
        self.event, self.data, self.joined = "", [], 0  # joined: data[:joined] are many lines each
        self.unknown: list[tuple[str, str]] = []  # lines of other fields, for the reader to clear

    def feed(self, chunk: bytes) -> list[tuple[str, str]]:
        """Take the next bytes of the stream; return the (event, data) pairs they complete."""
        if self.after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the LF of a CRLF that was split across two reads
        if not chunk:
            return []
        if (  # most reads of a stream: one whole event, one "data: " line, LF-ended: a shortcut
            self.started
            and not (self.pending or self.data or self.on_line)
            and chunk.startswith(b"data: ")
            and chunk.endswith(b"\n\n")
        ):
            data = chunk[6:-2].decode("utf-8", "replace")
            if "\n" not in data and "\r" not in data:
                event, self.event, self.after_cr = self.event, "", False
                return [(event, data)]
        self.after_cr = chunk.endswith(b"\r")
        if b"\n" not in chunk and b"\r" not in chunk:
            self.pending.append(chunk)
            self.pending_size += len(chunk)
            if self.pending_size > MAX_REPLY:
                raise ApiError(f"an event in the stream is larger than {MAX_REPLY // 2**20} MiB")
            return []
        data = b"".join(self.pending) + chunk if self.pending else chunk
        lines = data.splitlines()  # at LF, CRLF and CR only: str.splitlines() knows more breaks
        last = lines.pop() if lines and not data.endswith((b"\n", b"\r")) else b""
        self.pending, self.pending_size = ([last], len(last)) if last else ([], 0)
        if lines and not self.started:
            self.started = True
            lines[0] = lines[0].removeprefix(b"\xef\xbb\xbf")  # the spec strips one BOM
        events = []
        for line in lines:
            text = line.decode("utf-8", "replace") if line else ""
            if self.on_line:
                self.on_line(text)
            if not text:  # a blank line dispatches the event
                if self.data:
                    events.append((self.event, "\n".join(self.data)))
                self.event, self.data, self.data_size, self.joined = "", [], 0, 0
            elif not text.startswith(":"):  # a colon first makes a comment
                field, _, value = text.partition(":")
                value = value.removeprefix(" ")
                if field == "data":
                    self.data.append(value)
                    self.data_size += len(value) + 1  # and the newline that joins it
                    if len(self.data) - self.joined > 1024:  # many short lines: held as one
                        self.data[self.joined :] = ["\n".join(self.data[self.joined :])]
                        self.joined += 1
                    if self.data_size > MAX_REPLY:
                        raise ApiError(
                            f"an event in the stream is larger than {MAX_REPLY // 2**20} MiB"
                        )
                elif field == "event":
                    self.event = value
                elif field not in ("id", "retry"):  # they matter only to a client that reconnects
                    self.unknown.append((field, value))
        return events


def read_stream_event(event: str, data: str, reply: Reply) -> tuple[str, str]:
    """The text and reasoning an event adds to choice 0; the rest is recorded on reply."""
    try:
        chunk = json.loads(data)
    except (ValueError, RecursionError):
        if not data.strip():
            return "", ""  # empty or blank data: a keep-alive some servers send
        chunk = None
    if not isinstance(chunk, dict) or event == "error" or "error" in chunk:  # most pass at once
        if event != "error" and not isinstance(chunk, dict):
            raise ApiError(f"malformed event in the stream: {data!r}")
        raise ApiError(
            f"the server reported an error mid-stream: {error_message(chunk) or data}",
            overflow=bool(CONTEXT_OVERFLOW.search(data)),
        )
    if chunk.get("usage"):
        reply.usage = chunk["usage"]
    if not reply.model and isinstance(chunk.get("model"), str):
        reply.model = chunk["model"]
    text = reasoning = ""
    choices = chunk.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        index = choice.get("index", 0)
        if index != 0:  # -o n 3: only the first answer is shown
            # an index past any real -o n (or no number) counts as one more choice
            reply.choices = max(
                reply.choices, index + 1 if isinstance(index, int) and index < 10**6 else 2
            )
            continue
        if choice.get("finish_reason"):
            reply.finish_reason = choice["finish_reason"]
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            continue
        if len(delta) == 1 and type(delta.get("content")) is str:  # most deltas: text alone
            text, reasoning = delta["content"], ""
        else:
            text, reasoning = split_message(delta)
            text = text or ""
            if "tool_calls" in delta:
                reply.size += add_tool_calls(reply.tool_calls, delta["tool_calls"])
        reply.size += len(text) + len(reasoning)
    return text, reasoning


class Output:
    """One reply as it arrives: text on stdout, reasoning on stderr (dimmed, or labelled), a
    spinner until either starts; finish() ends it all, whatever happened."""

    def __init__(self, env: Env, show_reasoning: bool, spin: bool):
        self.env, self.show_reasoning = env, show_reasoning
        self.text_end: str | None = None  # the last character on stdout; None before any
        self.reasoning_end: str | None = None  # the same for reasoning being shown on stderr
        self.held_cr = ""  # a terminal's "\r" at the end of a delta waits: the next may be "\n"
        if spin:
            env.start_spinner()

    def reasoning(self, text: str) -> None:
        if not text or not self.show_reasoning:
            return
        if self.reasoning_end is None:
            self.env.stop_spinner()
            self.env.stdout.flush()  # text before it, still buffered, is drawn before it
            self.env.stderr.write(DIM if self.env.color else "reasoning:\n")
        self.env.stderr.write(visible(text))
        self.reasoning_end = text[-1]

    def text(self, text: str) -> None:
        if not text:
            return
        if self.reasoning_end is not None or self.env.spinner:
            self.end_reasoning()
        if self.env.stdout_tty:
            text, self.held_cr = self.held_cr + text, ""
            if text.endswith("\r"):
                text, self.held_cr = text[:-1], "\r"
        self.env.write(text)
        self.text_end = text[-1:] or self.text_end or ""

    def flush(self) -> None:
        if self.reasoning_end is not None:  # else end_reasoning() flushed stderr
            self.env.stderr.flush()
        self.env.stdout.flush()

    def end_reasoning(self, interrupted: bool = False) -> None:
        """Stop the spinner; end the reasoning with a blank line (after Ctrl-C, just its colour)."""
        self.env.stop_spinner()
        if self.reasoning_end is not None:
            ending = "" if interrupted else "\n" * (1 + (self.reasoning_end != "\n"))
            self.env.stderr.write((NORMAL if self.env.color else "") + ending)
            self.env.stderr.flush()
            self.reasoning_end = None

    def finish(self, outcome: str) -> None:
        """Tidy up: a "complete" reply ends with one newline, a "failed" one with its line ended;
        "interrupted" leaves stdout as it is."""
        self.end_reasoning(interrupted=outcome == "interrupted")
        if self.held_cr:
            self.env.write(self.held_cr)
            self.text_end, self.held_cr = "\r", ""
        if outcome != "interrupted" and (
            self.text_end not in (None, "\n") or (outcome == "complete" and self.text_end is None)
        ):
            self.env.stdout.write("\n")
        self.flush()
        self.env.release()


def stream_reply(response, server: Server, output: Output, trace: Trace | None) -> Reply:
    """Show a streamed reply as it arrives, and return it whole. Keep-alives only is a timeout."""
    reply, texts, thoughts, think = Reply(streamed=True), [], [], ThinkBlock()
    decoder = SSEDecoder(trace.sse_line if trace else None)
    last_data = time.monotonic()
    try:
        for chunk in iter_body(response, server):
            held = reply.size  # what grows it is progress; delta: {} and the like are keep-alives
            for event, data in decoder.feed(chunk):
                if data == "[DONE]":
                    reply.done = True
                    break
                text, reasoning = read_stream_event(event, data, reply)
                if text and think.state != "text":
                    text, thought = think.split(text)
                    reasoning += thought
                if reasoning:
                    output.reasoning(reasoning)
                    thoughts.append(reasoning)
                if text:
                    output.text(text)
                    texts.append(text)
            # One flush per network read, not per delta: the text that has arrived is
            # on screen before the next wait, with a fraction of the write calls.
            output.flush()
            for field, value in decoder.unknown:
                if field == "error":  # llama-box, GPUStack: `error: {...}` outside SSE's
                    read_stream_event(field, value, reply)
            decoder.unknown.clear()
            if reply.done:
                break
            if reply.size > MAX_REPLY:
                raise ApiError(
                    f"the streamed reply passed {MAX_REPLY // 2**20} MiB; chat.py stopped there"
                )
            if reply.size > held:
                last_data = time.monotonic()
            elif time.monotonic() - last_data > server.timeout:
                raise TimedOut(
                    f"{server.host} sent no data for {server.timeout:g} s, only keep-alives "
                    "(--timeout)"
                )
        if not reply.done and not reply.finish_reason:
            raise NetworkError(
                "the connection closed before the reply was complete", retryable=True
            )
    except ChatError as error:
        error.retryable = (
            error.retryable and output.text_end is None
        )  # nothing shown: a retry may help
        raise
    finally:
        response.close()
    text, thought = think.split("", last=True)
    output.reasoning(thought)
    output.text(text)
    text, reasoning = "".join(texts) + text, "".join(thoughts) + thought
    calls = after_text(text, tool_call_lines(reply.tool_calls))
    output.text(calls)
    reply.text, reply.reasoning = text + calls, reasoning
    return reply


def token_detail(usage, group: str, name: str) -> int | None:
    """A count inside usage's prompt_tokens_details or completion_tokens_details, if reported."""
    details = usage.get(group) if isinstance(usage, dict) else None
    value = details.get(name) if isinstance(details, dict) else None
    return value if isinstance(value, int) else None


def reply_warnings(reply: Reply) -> list[str]:
    """What to tell the user about a reply that may not be whole, or was one of several."""
    warnings = []
    if reply.choices > 1:
        warnings.append(
            f"the server sent {reply.choices} choices (-o n); only the first is shown, "
            f"{reply.choices - 1} dropped"
        )
    if reply.finish_reason == "length" and not reply.text.strip():
        count = token_detail(reply.usage, "completion_tokens_details", "reasoning_tokens")
        tokens = f" ({count} reasoning tokens)" if count is not None else ""
        warnings.append(
            f"the token limit went to reasoning{tokens} before any answer: "
            "raise --max-tokens or lower --reasoning-effort"
        )
    elif reply.finish_reason == "length":
        warnings.append("the reply was cut off at the token limit (finish_reason: length)")
    elif reply.finish_reason == "content_filter":
        warnings.append(
            "the reply was cut off by the content filter (finish_reason: content_filter)"
        )
    elif reply.reasoning and not reply.text.strip():
        warnings.append("the reply was only reasoning, no answer")
    return warnings


def usage_line(usage) -> str:
    """-u: the token counts the server reported, as they were reported."""
    if not (
        isinstance(usage, dict)
        and isinstance(usage.get("prompt_tokens"), int)
        and isinstance(usage.get("completion_tokens"), int)
    ):
        return "usage: not reported by the server"
    counts = [f"{usage['prompt_tokens']} in", f"{usage['completion_tokens']} out"]
    for group, name, label in (
        ("prompt_tokens_details", "cached_tokens", "cached"),
        ("completion_tokens_details", "reasoning_tokens", "reasoning"),
    ):
        if (value := token_detail(usage, group, name)) is not None:
            counts.append(f"{value} {label}")
    return "usage: " + ", ".join(counts)


def check_json_reply(text: str, schema: dict) -> None:
    """--schema: the reply must be JSON with every field the schema requires at its top."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ApiError(f"the reply is not the JSON --schema asked for: {exc}") from None
    required = schema.get("required") if isinstance(schema.get("required"), list) else []
    missing = [
        name
        for name in required
        if isinstance(name, str) and not (isinstance(value, dict) and name in value)
    ]
    if missing:
        raise ApiError(
            f"the reply lacks the field{'s' if len(missing) > 1 else ''} "
            f"{', '.join(map(str, missing))} that --schema asked for"
        )


# ------------------------------------------------------------ saved conversations


def state_dir(env: Env) -> str:
    """$CHAT_PY_HOME, else $XDG_STATE_HOME/chat-py (if absolute), else ~/.local/state/chat-py
    (on Windows %LOCALAPPDATA%\\chat-py)."""
    state = env.get("XDG_STATE_HOME")
    if not os.path.isabs(state):  # an empty or relative value is ignored, as the XDG spec says
        home = env.get("HOME") or os.path.expanduser("~")
        local = env.get("LOCALAPPDATA") or os.path.join(home, "AppData", "Local")
        state = local if WINDOWS else os.path.join(home, ".local", "state")
    return env.path(env.get("CHAT_PY_HOME") or os.path.join(state, "chat-py"))  # no NUL in it


def check_way_to(path: str) -> None:
    """Refuse a path another user could redirect: a link of theirs on the way, or a folder above
    it that they own or may write to (one with the sticky bit, such as /tmp, is fine)."""
    import pathlib
    import shlex

    if not hasattr(os, "getuid"):  # Windows: no owners and modes to ask about
        return
    given = pathlib.Path(os.path.abspath(path))
    for step in sorted({given, *given.parents, *pathlib.Path(os.path.realpath(path)).parents}):
        try:
            info = os.lstat(step)
        except OSError:  # not made yet: chat.py makes it, 0700
            continue
        theirs = info.st_uid not in (os.getuid(), 0)  # root owns /, /home, /tmp ...
        if stat.S_ISLNK(info.st_mode) and theirs:
            raise UsageError(
                f"{step} is a symbolic link of another user (uid {info.st_uid}), who can point "
                "it anywhere",
                hint="(remove it, or use a folder of your own)",
            )
        if (
            stat.S_ISDIR(info.st_mode)
            and step != given
            and (theirs or info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX)
        ):
            raise UsageError(
                f"the folder {step}, on the way to {path}, can be changed by another user, who "
                "could swap what is in it",
                hint=f"(chmod go-w {shlex.quote(str(step))} if it is yours, or use another folder)",
            )


def check_folder(folder: str) -> None:
    """Refuse a folder owned by someone else or writable by others, as ssh refuses such a ~/.ssh,
    and one whose way there another user could change."""
    import shlex

    check_way_to(folder)
    try:
        info = os.stat(folder)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UsageError(f"cannot use the folder {folder}: {exc.strerror}") from None
    if not hasattr(os, "getuid"):  # Windows: owners and access are ACLs, which stat cannot tell
        return
    if info.st_uid != os.getuid():
        raise UsageError(
            f"the folder {folder} belongs to another user (uid {info.st_uid}); chat.py "
            "keeps conversations only in a folder of your own",
            hint=f"(chown it to yourself, then chmod 700 {shlex.quote(folder)}; "
            "or set CHAT_PY_HOME)",
        )
    if info.st_mode & 0o022:
        raise UsageError(
            f"the folder {folder} is writable by others, who could plant files there",
            hint=f"(chmod 700 {shlex.quote(folder)} fixes it)",
        )


def make_folder(folder: str) -> None:
    """Create folder and any missing parents, each 0700 whatever the umask."""
    umask = os.umask(0o077)
    try:
        os.makedirs(folder, exist_ok=True)
    finally:
        os.umask(umask)


def make_private(fd: int) -> None:
    """0600 whatever the umask; os.fchmod is missing on Windows before Python 3.13 (where a mode
    says only whether a file is read-only)."""
    if hasattr(os, "fchmod"):
        os.fchmod(fd, 0o600)


def is_link(info: os.stat_result) -> bool:
    """A symbolic link, or on Windows any reparse point (a junction too)."""
    reparse = getattr(info, "st_file_attributes", 0) & stat.FILE_ATTRIBUTE_REPARSE_POINT
    return stat.S_ISLNK(info.st_mode) or bool(reparse)


def nonblocking(flags: int) -> int:
    """flags, plus not waiting on a FIFO where the platform has that flag, and binary (Windows
    would otherwise translate line ends)."""
    return flags | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


def open_private(path: str, flags: int = os.O_RDONLY) -> int:
    """A file in the state folder, never through a link, and only a regular file."""
    if not hasattr(os, "O_NOFOLLOW") and os.path.lexists(path) and is_link(os.lstat(path)):
        raise OSError(0, "a symbolic link, which chat.py does not follow")  # Windows: lstat
    fd = os.open(path, nonblocking(flags) | getattr(os, "O_NOFOLLOW", 0), 0o600)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise IsADirectoryError(0, "not a regular file")
    return fd


def read_private(path: str) -> bytes:
    try:
        with open(open_private(path), "rb") as file:
            return file.read()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None


def check_name(name: str) -> str:
    """A conversation name, checked before any file is touched: it can never become a path."""
    name = name.removesuffix(".jsonl")
    if not NAME_PATTERN.fullmatch(name):
        raise UsageError(
            f"{name!r} is not a conversation name: use up to 64 letters, digits, "
            "'.', '_' or '-', not starting with '.'"
        )
    return name


def new_name(folder: str) -> str:
    """A fresh conversation name that sorts by time, such as 20261126-191002-a3f."""
    while True:
        name = time.strftime("%Y%m%d-%H%M%S-") + os.urandom(2).hex()[:3]
        if not os.path.lexists(os.path.join(folder, f"{name}.jsonl")):
            return name


def not_a_file(path: str) -> str | None:
    """Why a conversation file cannot be used (a link, a folder, a device), or None."""
    info = os.lstat(path)
    if is_link(info):
        return "is a symbolic link, which chat.py does not follow"
    return None if stat.S_ISREG(info.st_mode) else "is not a regular file"


def saved_conversations(folder: str, env: Env) -> list[tuple[int, str]]:
    """(modification time, name) of each conversation, newest first; links are skipped, with a
    warning."""
    check_folder(folder)
    try:
        entries = [entry for entry in os.scandir(folder) if entry.name.endswith(".jsonl")]
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise UsageError(f"cannot read the conversations in {folder}: {exc.strerror}") from None
    found = []
    for entry in entries:
        if entry.is_file(follow_symlinks=False):
            found.append(
                (entry.stat(follow_symlinks=False).st_mtime_ns, entry.name.removesuffix(".jsonl"))
            )
        else:
            env.warn(f"skipped {entry.path}: {not_a_file(entry.path)}")
    return sorted(found, reverse=True)


def conversation_path(folder: str, name: str) -> str:
    """The file of an existing conversation; an unknown name, a link or a device is a usage
    error."""
    check_folder(folder)
    path = os.path.join(folder, f"{check_name(name)}.jsonl")
    try:
        problem = not_a_file(path)
    except FileNotFoundError:
        raise UsageError(
            f"no conversation named {name!r} in {folder}",
            hint="(python chat.py --chats lists them)",
        ) from None
    if problem:
        raise UsageError(f"{path} {problem}")
    return path


def newest_conversation(folder: str, env: Env) -> str:
    for _, name in saved_conversations(folder, env):
        return name
    raise UsageError(f"no saved conversation in {folder} yet: ask a question first")


def load_turns(path: str, env: Env) -> list[dict]:
    """A conversation's turns; a line that is not one is skipped with a warning, a retry
    replaces one."""
    turns = []
    for number, line in enumerate(read_private(path).split(b"\n"), 1):  # U+2028 is no line break
        if not line.strip():
            continue
        if line.strip() == UNDO_LINE:
            turns = turns[:-1]
            continue
        try:
            turn = json.loads(line)
        except (ValueError, RecursionError):
            turn = None
        if not (
            isinstance(turn, dict)
            and isinstance(turn.get("user"), dict)
            and isinstance(turn.get("assistant"), str)
        ):
            env.warn(
                f"{path} line {number} is not a saved turn (a torn write or a bad edit?); skipped"
            )
            continue
        for name in [name for name in TURN_TEXTS if not isinstance(turn.get(name, ""), str)]:
            env.warn(f"{path} line {number}: its {name} is not text; ignored")
            del turn[name]
        if turn.pop("retry", False) and turns:
            turns.pop()
        turns.append(turn)
    return turns


def open_conversation(args: argparse.Namespace, folder: str, save: bool, env: Env) -> Conversation:
    """The conversation this run goes on with (-c, --chat NAME), or a new one."""
    if args.continue_ and args.chat is not None:
        raise UsageError("-c and --chat cannot go together: -c continues the newest conversation")
    if not args.continue_ and args.chat is None:
        return Conversation(folder, new_name(folder), save=save)
    name = check_name(args.chat) if args.chat is not None else newest_conversation(folder, env)
    conversation = Conversation(folder, name, save=save)
    if os.path.lexists(conversation.path):
        conversation.turns = load_turns(conversation_path(folder, name), env)
    return conversation


def append_line(conversation: Conversation, turn: dict, secrets: tuple[str, ...]) -> None:
    """Append a turn as one line with one write, then fsync, to a 0600 file; no secret is
    written."""
    check_folder(conversation.folder)
    make_folder(conversation.folder)
    # A lone surrogate (a reply's "\ud800", a byte of argv that is not UTF-8) is written as its
    # JSON escape: inside a JSON string, as every non-ASCII character is, it reads back the same.
    data = (redact(json.dumps(turn, ensure_ascii=False), secrets) + "\n").encode(
        "utf-8", "backslashreplace"
    )
    fd = open_private(conversation.path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
    try:
        make_private(fd)
        if os.fstat(fd).st_size:  # the last byte by lseek, not pread (Windows lacks it)
            os.lseek(fd, -1, os.SEEK_END)
            if os.read(fd, 1) != b"\n":
                data = b"\n" + data  # never glue a turn onto a torn last line
        while data:  # one write, unless the disk fills up: then the next one says why
            data = data[os.write(fd, data) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def save_line(conversation: Conversation, line: dict, env: Env) -> None:
    """Append a line to a saved conversation's file; a failure to save is a warning."""
    try:
        if conversation.save:
            append_line(conversation, line, env.secrets)
    except UsageError as exc:
        env.warn(f"could not save the conversation: {exc}", f" {exc.hint}" if exc.hint else "")
    except OSError as exc:
        env.warn(f"could not save the conversation to {conversation.path}: {exc.strerror or exc}")


def save_turn(conversation: Conversation, turn: dict, env: Env, retry: bool = False) -> None:
    """Keep a finished turn (a retry replaces the last)."""
    if retry:
        conversation.turns.pop()
    conversation.turns.append(turn)
    save_line(conversation, {"retry": True, **turn} if retry else turn, env)


def make_turn(
    body: dict, user_message: dict, reply: Reply, attached: list[str], base_url: str
) -> dict:
    """A turn as it is saved; attachments: the name the user gave each part after the text."""
    first = body["messages"][0]
    return drop_nones(
        {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": body.get("model"),
            "system": first["content"] if first.get("role") == "system" else None,
            "user": user_message,
            "attachments": list(attached) or None,
            "assistant": reply.text,
            "answered_by": reply.model,
            "finish_reason": reply.finish_reason,
            "usage": reply.usage,
            "base_url": public_url(base_url),
        }
    )


def plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def list_conversations(folder: str, env: Env) -> None:
    """--chats: one line per conversation, newest first; only its first line is parsed."""
    saved = saved_conversations(folder, env)
    if not saved:
        env.say(f"no saved conversations in {folder}")
    width = max((len(name) for _, name in saved), default=0)
    for mtime, name in saved:
        path = os.path.join(folder, f"{name}.jsonl")
        lines = read_private(path).split(b"\n")
        turns = max(  # an undo line drops itself and the turn before it, if there was one
            0,
            sum(1 for line in lines if line.strip() and not line.startswith(RETRY_LINE_START))
            - 2 * lines.count(UNDO_LINE),
        )
        try:  # the first question, unless /undo dropped it
            first = load_turns(path, env)[0] if UNDO_LINE in lines else json.loads(lines[0])
            question = one_line(message_text(first["user"]["content"]) or "", room=60)
        except (ValueError, KeyError, TypeError, RecursionError, IndexError):
            question = "?"
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(mtime / 1e9))
        env.write(f"{name:<{width}}  {plural(turns, 'turn'):>9}  {when}  {question}\n")


def readable(turn: dict) -> str:
    """A turn's question, then an [image: ...], [file: ...] or [audio: ...] line per attachment,
    named as the user gave it (in a turn saved without the names, what the part holds)."""
    content = turn["user"].get("content")
    parts = [
        part
        for part in (content if isinstance(content, list) else [])
        if isinstance(part, dict)
        and isinstance(part.get("type"), str)
        and part["type"] in PART_KINDS
        and part["type"] != "text"
    ]
    names = turn.get("attachments") or turn.get("images")  # "images": saved before v4
    if not (isinstance(names, list) and len(names) == len(parts)):
        names = [
            next(iter(value.values()), "?")
            if isinstance(value := part.get(part["type"]), dict)
            else "?"
            for part in parts
        ]
    return "\n".join(
        [message_text(content) or ""]
        + [
            f"[{PART_KINDS[part['type']].word}: "
            f"{elide_base64(name if isinstance(name, str) else '?')}]"
            for part, name in zip(parts, names, strict=True)
        ]
    )


def indented(text: str) -> str:
    """text with each line that is not empty indented, so that none can pass for a header."""
    return re.sub(r"(?m)^(?=.)", "  ", text)  # only \n ends a line here, as in a terminal


def show_conversation(path: str, env: Env) -> None:
    """--show: the conversation for a person to read, each question and answer in order: headers
    of one line at the start of a line, the texts indented under them."""
    from datetime import datetime

    turns, system = load_turns(path, env), None
    env.write(
        f"conversation {os.path.basename(path).removesuffix('.jsonl')}: "
        f"{plural(len(turns), 'turn')}\n"
    )
    for turn in turns:
        if turn.get("system") != system:
            system = turn.get("system")
            env.write(
                f"\nsystem prompt:\n{indented(system)}\n" if system else "\nsystem prompt: (none)\n"
            )
        when = turn.get("time", "")
        try:
            # Python 3.10's fromisoformat takes no "Z"
            when = datetime.fromisoformat(when.replace("Z", "+00:00")).astimezone()  # noqa: FURB162
            when = when.strftime("%Y-%m-%d %H:%M")
        except (ValueError, OverflowError):  # not a date, or one the local clock cannot show
            pass
        env.write(
            f"\nyou{', ' if when else ''}{one_line(when, room=40)}:\n{indented(readable(turn))}\n"
        )
        # the model's name comes from the server: after a fixed word it cannot pass for "you"
        name = one_line(turn.get("answered_by") or turn.get("model") or "", room=80)
        env.write(f"\nassistant{f' ({name})' if name else ''}:\n{indented(turn['assistant'])}\n")


# ------------------------------------------------------------ the command line


def number_type(convert, wanted: str, is_valid=lambda value: True):
    """An argparse type: a finite number (convert is int or float) for which is_valid holds."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or not is_valid(value):
            raise argparse.ArgumentTypeError(f"must be {wanted}, not {text!r}")
        return value

    return parse


def raise_usage_error(message: str):
    # "argument --max-tokens: must be ..." reads better as "--max-tokens must be ..."
    raise UsageError(re.sub(r"^argument (\S+): must be", r"\1 must be", message) + " (see --help)")


def build_parser(settings: str = "~/.config/chat-py/env") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chat.py",
        add_help=False,
        description="Ask an OpenAI-compatible chat-completions API. With no question on a "
        "terminal, start a conversation. Answered questions are saved: -c goes on.",
        epilog="Exit codes: 0 ok, 1 API error, 2 usage or input error, 3 network failure, "
        "4 timeout, 70 a bug in chat.py, 130 interrupted. OPENAI_API_KEY, OPENAI_BASE_URL, "
        "OPENAI_MODEL, CHAT_PY_HOME and CHAT_PY_NO_SAVE come from the environment, else from "
        f"{settings} (./.env may set only the key and model); conversations are saved in "
        "$CHAT_PY_HOME, else $XDG_STATE_HOME/chat-py, else ~/.local/state/chat-py.",
    )
    add = parser.add_argument
    add("question", nargs="*", help="the question; piped stdin is appended")
    add("-h", "--help", action="store_true", help="show this help and exit")
    add(
        "-c",
        "--continue",
        dest="continue_",
        action="store_true",
        help="continue the newest conversation",
    )
    add("--chat", metavar="NAME", help="continue conversation NAME, or start it")
    add("--chats", action="store_true", help="list the saved conversations, newest first")
    add(
        "--show",
        nargs="?",
        const="",
        metavar="NAME",
        help="print a conversation (default: the newest)",
    )
    add("--forget", nargs="+", metavar="NAME", help="delete saved conversations")
    add("--no-save", action="store_true", help="do not save this run (or set CHAT_PY_NO_SAVE=1)")
    add(
        "-f",
        "--file",
        action="append",
        dest="attach",
        type=lambda path: (path, False),
        default=[],
        metavar="PATH",
        help="add a file: text, PDF, image or audio (repeatable)",
    )
    add(
        "--image",
        action="append",
        dest="attach",
        type=lambda source: (source, True),
        default=[],
        metavar="PATH_OR_URL",
        help="attach an image (repeatable)",
    )
    add(
        "--detail",
        choices=["low", "high", "original", "auto"],
        help="image detail, and how far to shrink",
    )
    add(
        "--schema",
        metavar="SPEC",
        help="answer in JSON: a JSON Schema, @file.json or 'name, age int'",
    )
    add("--stream", action=argparse.BooleanOptionalAction, help="print the reply as it arrives")
    add("-m", "--model", metavar="NAME", help=f"model (env OPENAI_MODEL, else {DEFAULT_MODEL})")
    add("-s", "--system", metavar="TEXT", help="system prompt ('' for none)")
    add(
        "--temperature",
        type=number_type(float, "a number"),
        metavar="F",
        help="sampling temperature",
    )
    add(
        "--max-tokens",
        type=number_type(int, "a whole number of at least 1", lambda value: value >= 1),
        metavar="N",
        help="most tokens in the reply",
    )
    add("--reasoning-effort", metavar="LEVEL", help="sent as reasoning_effort (servers differ)")
    add(
        "--reasoning",
        choices=["show", "hide"],
        help="reasoning on stderr (default: shown on a terminal)",
    )
    add(
        "-o",
        "--option",
        nargs=2,
        action="append",
        default=[],
        metavar=("KEY", "VALUE"),
        help="set any body field: VALUE as JSON, else text; null leaves it out (repeatable)",
    )
    add("-u", "--usage", action="store_true", help="print the token usage on stderr")
    add("--models", action="store_true", help="list the server's models and exit")
    add(
        "--base-url", metavar="URL", help=f"API root (env OPENAI_BASE_URL, else {DEFAULT_BASE_URL})"
    )
    add(
        "--timeout",
        type=lambda text: min(
            number_type(float, "a number of seconds above 0", lambda value: value > 0)(text),
            MAX_TIMEOUT,
        ),
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help="seconds to wait for each read (default: %(default)g)",
    )
    add(
        "--retries",
        type=number_type(int, "a whole number of at least 0", lambda value: value >= 0),
        default=DEFAULT_RETRIES,
        metavar="N",
        help="retries of a failed request (default: %(default)s)",
    )
    add(
        "-v",
        "--verbose",
        action="store_true",
        help="trace the HTTP exchange on stderr (the key masked)",
    )
    add("--curl", action="store_true", help="print the equivalent curl command and send nothing")
    add("--version", action="store_true", help="print the version and exit")
    parser.error = raise_usage_error
    return parser


def settings_path(env: Env) -> str:
    """$CHAT_PY_CONFIG, else $XDG_CONFIG_HOME/chat-py/env (if absolute), else
    ~/.config/chat-py/env (on Windows %APPDATA%\\chat-py\\env)."""
    config = env.get("XDG_CONFIG_HOME")
    if not os.path.isabs(config):  # an empty or relative value is ignored, as in state_dir
        home = os.path.join(env.get("HOME") or os.path.expanduser("~"), ".config")
        config = (WINDOWS and env.get("APPDATA")) or home
    return env.path(env.get("CHAT_PY_CONFIG") or os.path.join(config, "chat-py", "env"))


def read_env_lines(
    data: bytes, label: str, names: tuple[str, ...], env: Env, why: str, warned=re.compile(".+")
) -> dict[str, str]:
    """names from the NAME=value lines of a .env-style file; nothing of it enters the
    environment. Lines python-dotenv cannot parse, and other names that warned matches, get a
    warning (saying why)."""
    import io
    import logging

    # about 15 ms to import; only paid when there is a file
    from dotenv import dotenv_values

    def warn_instead(record: logging.LogRecord) -> bool:
        env.warn(f"{label}: " + record.getMessage().removeprefix("python-dotenv ") + " (skipped)")
        return False

    logger = logging.getLogger("dotenv.main")
    logger.addFilter(warn_instead)
    try:
        values = dotenv_values(
            stream=io.StringIO(data.decode("utf-8", "replace")), interpolate=False
        )
    finally:
        logger.removeFilter(warn_instead)
    if ignored := sorted(name for name in values if name not in names and warned.fullmatch(name)):
        env.warn(f"{label}: {', '.join(ignored)} ignored", f": {why}")
    return {
        name: value.strip()
        for name, value in values.items()
        if name in names and value and value.strip()
    }


def read_dotenv(env: Env) -> dict[str, str]:
    """DOTENV_NAMES from ./.env, and nothing else."""
    try:
        with open(os.open(env.path(".env"), nonblocking(os.O_RDONLY)), "rb") as file:
            data = (
                file.read(MAX_DOTENV + 1) if stat.S_ISREG(os.fstat(file.fileno()).st_mode) else None
            )
    except OSError:
        return {}
    if data is None or len(data) > MAX_DOTENV:
        env.warn(f".env is not a regular file of at most {MAX_DOTENV // 1024} KiB; ignored")
        return {}
    return read_env_lines(
        data,
        ".env",
        DOTENV_NAMES,
        env,
        "a .env sets only the key and model; set the others in your shell (a base URL also "
        f"with --base-url or in {settings_path(env)})",
        IGNORED_IN_DOTENV,
    )


def read_settings(env: Env) -> dict[str, str]:
    """SETTINGS_NAMES from the user's own settings file, which is refused, as a state folder is,
    unless it is a small regular file that only they can change."""
    import shlex

    path = settings_path(env)
    what = f"the settings file {path}"
    try:
        if is_link(os.lstat(path)):
            raise UsageError(
                f"{what} is a symbolic link, which chat.py does not follow",
                hint="(put the file itself there)",
            )
        with open(open_private(path), "rb") as file:
            info, data = os.fstat(file.fileno()), file.read(MAX_DOTENV + 1)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise UsageError(f"cannot read {what}: {exc.strerror}") from None
    if len(data) > MAX_DOTENV:
        raise UsageError(f"{what} is larger than {MAX_DOTENV // 1024} KiB")
    check_way_to(path)
    # Windows: owners and access are ACLs, which stat cannot tell
    if hasattr(os, "getuid") and (info.st_uid != os.getuid() or info.st_mode & 0o022):
        raise UsageError(
            f"{what} can be changed by another user (owner uid {info.st_uid}, "
            f"mode {info.st_mode & 0o777:o}), who could send your questions anywhere",
            hint=f"({'' if info.st_uid == os.getuid() else 'chown it to yourself, then '}"
            f"chmod 600 {shlex.quote(path)})",
        )
    return read_env_lines(
        data, path, SETTINGS_NAMES, env, f"it sets only {', '.join(SETTINGS_NAMES)}"
    )


def read_server_settings(args: argparse.Namespace, env: Env) -> Server:
    """The base URL, key and model: the command line, the environment, ./.env (key and model
    only), the settings file, then chat.py's defaults."""
    env.configured.update(read_dotenv(env))
    source = (
        "--base-url"
        if args.base_url
        else "OPENAI_BASE_URL"
        if env.environ.get("OPENAI_BASE_URL", "").strip()
        else f"OPENAI_BASE_URL in {settings_path(env)}"
    )
    base_url = check_base_url(
        args.base_url or env.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL, source
    )
    key = env.get("OPENAI_API_KEY")
    env.secrets = tuple(secret for secret in (key, urlsplit(base_url).password) if secret)
    return Server(base_url, key, args.timeout, args.retries, env.get("OPENAI_MODEL"))


def check_key(server: Server, env: Env) -> None:
    """Before anything is sent: a key for OpenAI, one that fits in a header, and a warning before
    it goes unencrypted."""
    where = urlsplit(server.base_url)  # as requests reads it: check_base_url saw to that
    if not server.key and is_openai_host(server.base_url):
        raise UsageError(
            "OPENAI_API_KEY is not set: export it, or put it in ./.env (see .env.example) or "
            f"{settings_path(env)}; a local server needs no key: pass its --base-url"
        )
    if not server.key:
        return
    # requests would refuse such a header, quoting it (and so the key) in its error; JSON escapes
    # a quote or a backslash, so a key holding one would escape redaction in the -v trace.
    if (
        not server.key.isascii()
        or not server.key.isprintable()
        or any(char in server.key for char in ' "\\')
    ):
        raise UsageError(
            "OPENAI_API_KEY holds spaces, quotes, backslashes, control or non-ASCII characters; "
            "check its value"
        )
    if where.scheme == "http" and not is_loopback(where.hostname):
        env.warn(f"sending the API key unencrypted to {server.host} over http://")


def make_settings(
    args: argparse.Namespace,
    env: Env,
    server: Server,
    conversation: Conversation,
    interactive: bool,
) -> Settings:
    """The run's settings; a continued conversation keeps its model and system prompt."""
    last = conversation.turns[-1] if conversation.turns else {}
    return Settings(
        model=args.model or last.get("model") or server.model or DEFAULT_MODEL,
        system=args.system if args.system is not None else last.get("system"),
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        reasoning_effort=args.reasoning_effort,
        options=parse_options(args.option),
        schema=parse_schema(args.schema, env) if args.schema is not None else None,
        stream=args.stream if args.stream is not None else interactive,
        usage=args.usage,
        show_reasoning=args.reasoning == "show" or (args.reasoning is None and env.stderr_tty),
        verbose=args.verbose,
    )


def curl_command(server: Server, body: dict) -> str:
    """A shell command that sends the same request with curl; the key stays in $OPENAI_API_KEY."""
    import shlex

    url = shown_url(api_url(server.base_url, "/chat/completions"))
    lines = [
        f"curl {'-N ' if body.get('stream') else ''}{shlex.quote(url)}",
        "-H 'Content-Type: application/json'",
        f"-H {shlex.quote('User-Agent: ' + USER_AGENT)}",
    ]
    if server.key or is_openai_host(server.base_url):
        lines.append('-H "Authorization: Bearer $OPENAI_API_KEY"')
    lines.append("--data-binary @- <<'JSON'")
    # A pretty-printed JSON document never has a line that is only JSON.
    return " \\\n  ".join(lines) + "\n" + json.dumps(body, indent=2, ensure_ascii=False) + "\nJSON"


# ------------------------------------------------------------------------ main


def overflow_hint(turns: int, interactive: bool, budget: bool) -> str:
    """The way out of a full context: a shorter question, or fewer turns; a smaller --max-tokens
    only where the request or the server counts tokens to write."""
    if not turns:
        way = "the question alone fills the model's context: shorten the question"
    else:
        way = (
            f"this conversation's {plural(turns, 'turn')} and the question fill the model's "
            "context: "
            + (
                "/undo drops the last turn, /reset starts a new conversation"
                if interactive
                else "start a new conversation (no -c)"
            )
        )
    return f"({way}{', or set a smaller --max-tokens' if budget else ''})"


def ask(chat: Chat, user_message: dict, attached: list[str] = (), retry: bool = False) -> Reply:
    """Send the conversation and the new question, show the reply, save the turn."""
    env, settings, server = chat.env, chat.settings, chat.server
    turns = chat.conversation.turns[:-1] if retry else chat.conversation.turns
    question = message_text(user_message.get("content")) or ""  # a saved turn may have none
    if len(question) > LARGE_QUESTION:
        env.warn(
            f"a large question: about {len(question) // 4:,} tokens "
            f"({len(question):,} characters); a small model's context may not hold it"
        )
    if hidden := TAG_CHARS.findall(question):
        env.warn(
            f"the question holds {plural(len(hidden), 'tag character')}, invisible text that a "
            f"model reads: {''.join(chr(ord(char) - 0xE0000) for char in hidden)!r}",
        )
    body = build_body(
        settings, build_messages(turns, user_message, settings.system), server.base_url
    )
    trace = Trace(env, server.key) if settings.verbose else None
    output = Output(env, settings.show_reasoning, spin=not trace)  # the trace shows progress itself

    outcome = "interrupted"
    try:
        reply = send_with_retries(
            chat.session,
            server,
            "/chat/completions",
            body,
            lambda response, streamed: (
                stream_reply(response, server, output, trace)
                if streamed
                else read_reply(response, server, trace)
            ),
            env,
            trace,
            [
                (
                    SYSTEM_REFUSED,
                    system_in_user,
                    (
                        "the server refuses the system role; sending the system prompt at "
                        "the start of the first user message"
                    ),
                ),
                (
                    FORMAT_REJECTED,
                    lambda body: json_object_fallback(body, settings.schema),
                    (
                        "the server rejects this response_format; sending it as "
                        '{"type": "json_object", "schema": ...}'
                    ),
                ),
            ],
        )
        if not reply.streamed:
            output.reasoning(reply.reasoning)
            output.text(reply.text)
        outcome = "complete"
    except ChatError as error:
        outcome = "failed"
        if isinstance(error, ApiError) and error.overflow:  # advice for a full context
            budget = {"max_tokens", "max_completion_tokens"} & body.keys()
            error.hint = overflow_hint(
                len(turns), chat.interactive, bool(budget or COMPLETION_BUDGET.search(str(error)))
            )
        elif isinstance(error, TimedOut) and settings.reasoning_effort:
            error.hint = "(a long think may need --stream or a larger --timeout)"
        elif isinstance(error, ApiError):
            error.hint = refusal_hint(str(error), body) or error.hint
        raise
    finally:
        output.finish(outcome)
    if trace:
        trace.summary(reply.usage)
    for warning in reply_warnings(reply):
        env.warn(warning)
    if settings.usage:
        env.say(usage_line(reply.usage))
    if settings.schema:
        check_json_reply(reply.text, settings.schema)
    save_turn(
        chat.conversation,
        make_turn(body, user_message, reply, attached, server.base_url),
        env,
        retry,
    )
    return reply


def print_models(server: Server, verbose: bool, env: Env) -> int:
    """--models: the ids the server lists at BASE_URL/models, sorted, one per line."""
    import requests

    trace = Trace(env, server.key) if verbose else None
    with requests.Session() as session:
        models = send_with_retries(
            session,
            server,
            "/models",
            None,
            lambda response, _: read_models(response, server, trace),
            env,
            trace,
        )
    if not models:
        env.warn("the server lists no models")
    env.write("".join(model + "\n" for model in models))
    return ExitStatus.OK


def manage_conversations(args: argparse.Namespace, folder: str, env: Env) -> int:
    """--chats, --show and --forget: no network, no key."""
    if args.chats:
        list_conversations(folder, env)
    elif args.forget:
        for name, path in [(name, conversation_path(folder, name)) for name in args.forget]:
            try:
                os.remove(path)
            except OSError as exc:
                raise UsageError(f"cannot delete {path}: {exc.strerror}") from None
            env.write(f"forgot {check_name(name)} (deleted {path})\n")
    else:
        show_conversation(
            conversation_path(folder, args.show or newest_conversation(folder, env)), env
        )
    return ExitStatus.OK


def run(args: argparse.Namespace, env: Env) -> int:
    """The program without its error handling."""
    if args.help or args.version:
        env.write(
            build_parser(settings_path(env)).format_help()
            if args.help
            else f"chat.py {__version__}\n"
        )
        return ExitStatus.OK
    env.configured = read_settings(env)
    folder = state_dir(env)
    if args.chats or args.show is not None or args.forget:
        return manage_conversations(args, folder, env)
    server = read_server_settings(args, env)
    if args.models:
        check_key(server, env)
        return print_models(server, args.verbose, env)
    if args.model == "":
        raise UsageError("-m/--model needs a model name")
    saving = not args.no_save and env.get("CHAT_PY_NO_SAVE") in ("", "0")
    conversation = open_conversation(args, folder, saving, env)
    piped = read_piped_stdin(env)
    # (source, a text block or a content part, a note for -v) for each -f and --image, in order
    attached = [
        (source, *read_attachment(source, args.detail, env, image)) for source, image in args.attach
    ]
    files, parts, names = split_attached(attached)
    interactive = not args.question and piped is None and not args.curl
    question = build_question(args.question, piped, files)
    if not question and not interactive:
        raise UsageError('no question given: try  python chat.py "Why is the sky blue?"')
    if not args.curl:
        check_key(server, env)
    settings = make_settings(args, env, server, conversation, interactive)
    if args.verbose:
        for _, _, note in attached:
            env.say(f"* {note}")
    if args.curl:
        messages = build_messages(
            conversation.turns, build_user_message(question, parts), settings.system
        )
        env.write(curl_command(server, build_body(settings, messages, server.base_url)) + "\n")
        if server.key and not env.environ.get("OPENAI_API_KEY", "").strip():
            env.warn("the key came from a file: export OPENAI_API_KEY for the command to send it")
        return ExitStatus.OK

    import requests

    with requests.Session() as session:
        chat = Chat(env, server, settings, conversation, session, interactive)
        if interactive:
            return converse(chat, attached, args.detail)
        ask(chat, build_user_message(question, parts), names)
    return ExitStatus.OK


def main(argv: list[str] | None = None, env: Env | None = None) -> int:
    """Run chat.py (in env, or this process) and return the exit status; failures end here."""
    if env is None:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        env = Env.of_process()
    try:
        return run(build_parser().parse_args(argv), env)
    except KeyboardInterrupt:
        env.stderr.write("\n")
        return ExitStatus.INTERRUPTED
    except BrokenPipeError:
        try:  # point stdout at /dev/null, so the flush at exit cannot fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), env.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return ExitStatus.OK
    except Exception as exc:
        package = PACKAGES.get((getattr(exc, "name", None) or "").partition(".")[0])
        if isinstance(exc, ModuleNotFoundError) and package:
            exc = UsageError(
                f"the {package} package is missing: this Python ({sys.executable}) cannot "
                f"import {exc.name}",
                hint="(pip install -r requirements.txt, or run chat.py "
                "with the python of the venv you installed into)",
            )
        if env.raise_bugs and not isinstance(exc, ChatError):
            raise
        if env.get("CHAT_PY_TRACEBACK"):
            import traceback

            env.stderr.write(
                visible(
                    redact(
                        "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
                        env.secrets,
                    )
                )
            )
        else:
            env.error(
                exc
                if isinstance(exc, ChatError)
                else ChatError(
                    f"unexpected {type(exc).__name__}: {exc}",
                    hint="(a bug in chat.py; CHAT_PY_TRACEBACK=1 shows where)",
                )
            )
        return exc.exit_status if isinstance(exc, ChatError) else ExitStatus.BUG


# ------------------------------------------------------------------ conversation mode


def leaving_keys() -> str:
    return "Ctrl-Z then Enter" if WINDOWS else "Ctrl-D"


class Talk:
    """Conversation mode between replies: the chat, what goes with the next message (-f and
    --image: the first question that gets an answer; /file and /image: the next), and the last
    question while it has no answer. Its methods are the commands' handlers (COMMANDS)."""

    def __init__(self, chat: Chat, attached: list[tuple], detail: str | None, terminal=None):
        self.chat, self.env, self.detail, self.terminal = chat, chat.env, detail, terminal
        self.startup, self.pending, self.unanswered = attached, list(attached), None
        self.sent: dict[int, list] = {}  # turn number: what went with that turn, for /undo

    def send(self, user_message: dict, names: list[str], retry: bool = False) -> bool:
        """Ask, and say whether the turn was kept; a failure is told and the session goes on."""
        if self.terminal:  # readline turned bracketed paste off: a paste now is one message too
            print(PASTE_ON, end="", file=self.terminal, flush=True)
        try:
            ask(self.chat, user_message, names, retry)
            return True
        except KeyboardInterrupt:
            self.env.stdout.write("\n")  # the partial reply stays on screen; the turn is not kept
        except ChatError as exc:
            self.env.error(exc, "" if getattr(exc, "overflow", False) else "(/retry to ask again)")
        return False

    def ask_message(self, text: str) -> None:
        files, parts, names = split_attached(self.pending)
        if self.send(build_user_message(build_question([], text, files), parts), names):
            self.sent[len(self.chat.conversation.turns)] = self.pending
            self.pending, self.unanswered = [], None
        else:
            self.unanswered = text

    def show_help(self, _) -> None:
        self.env.say(
            "\n".join(
                f"{', '.join(names) + ' ' + argument:<19} {text.format(keys=leaving_keys())}"
                for names, argument, text, _ in COMMANDS
            )
            + '\n"""                 alone on a line: starts or ends a multi-line message'
            '\n//text              send "/text" as a message; Ctrl-C drops the line being typed'
        )

    def reset(self, _) -> None:
        old = self.chat.conversation
        self.chat.conversation = Conversation(old.folder, new_name(old.folder), save=old.save)
        self.pending = list(self.startup)  # as at the start: a /file not yet sent is dropped
        self.unanswered = None
        self.env.say(
            f"(new conversation {self.chat.conversation.name}; "
            + ("the last one stays saved)" if old.save and old.turns else "nothing was saved)")
        )

    def retry(self, _) -> None:
        turns = self.chat.conversation.turns
        if self.unanswered is not None:
            self.ask_message(self.unanswered)
        elif turns:
            names = turns[-1].get("attachments")
            self.send(turns[-1]["user"], names if isinstance(names, list) else [], retry=True)
        else:
            self.env.say("(nothing to retry yet)")

    def undo(self, _) -> None:
        """Drop the last turn; its file gets a marker line, since files are never rewritten. What
        was attached to it goes with the next message instead."""
        conversation = self.chat.conversation
        if not conversation.turns:
            return self.env.say("(nothing to undo)")
        save_line(conversation, json.loads(UNDO_LINE), self.env)
        question = message_text(conversation.turns.pop()["user"].get("content")) or ""
        carried = self.sent.pop(len(conversation.turns) + 1, [])
        self.pending = carried + self.pending
        self.env.say(
            f"(undone: {one_line(question, room=40)!r}; "
            f"{plural(len(conversation.turns), 'turn')} left"
            + (
                f"; again with the next message: {', '.join(s for s, *_ in carried)})"
                if carried
                else ")"
            )
        )

    def model(self, name: str | None) -> None:
        self.chat.settings.model = name or self.chat.settings.model
        self.env.say(f"(model: {self.chat.settings.model})")

    def system(self, text: str | None) -> None:
        if text is not None:
            self.chat.settings.system = None if text in ("", "none") else text
        self.env.say(f"(system prompt: {self.chat.settings.system or 'none'})")

    def attach(self, source: str | None, image: bool = False) -> None:
        if source is None:
            return self.env.say(
                f"(with the next message: {', '.join(s for s, *_ in self.pending) or 'nothing'})"
            )
        source = os.path.expanduser(source)
        self.pending.append((source, *read_attachment(source, self.detail, self.env, image)))
        self.env.say(f"({self.pending[-1][2]}; it goes with the next message)")


# Conversation mode's commands: names, argument, help ({keys}: how to leave), and the handler,
# given the argument (None when none was typed; a true result leaves). A new command is a row.
COMMANDS = [
    (("/help",), "", "this list", Talk.show_help),
    (
        ("/exit", "/quit"),
        "",
        "leave (so do exit, quit and {keys})",
        lambda talk, _: True,
    ),
    (("/reset",), "", "start a new conversation (the old file stays)", Talk.reset),
    (("/retry",), "", "ask the last question again", Talk.retry),
    (("/undo",), "", "drop the last question and its answer", Talk.undo),
    (("/model",), "NAME", "use another model from the next question on", Talk.model),
    (("/system",), "TEXT", "set the system prompt ('' or none: no system prompt)", Talk.system),
    (("/file",), "PATH", "attach a file to the next message, as -f does", Talk.attach),
    (
        ("/image",),
        "PATH_OR_URL",
        "attach an image to the next message, as --image does",
        lambda talk, source: talk.attach(source, image=True),
    ),
]
COMMAND_NAMED = {name: row for row in COMMANDS for name in row[0]}


def unquoted(text: str) -> str:
    """An argument without quotes around it: /system '' is no system prompt, as -s '' is."""
    return text[1:-1] if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"" else text


def parse_command(line: str) -> tuple:
    """The handler of a line's /command and its argument (None: none typed), or (None, None)
    for a message: words not led by a command, //text, a paste or block of lines."""
    word, *rest = line.split(maxsplit=1) or [""]
    if (
        not word.startswith("/")
        or word.startswith("//")
        or "\n" in line
        or (rest and word not in COMMAND_NAMED)  # "/usr/bin is what?" is a question
    ):
        return None, None
    if word not in COMMAND_NAMED:
        word = word if len(word) <= 40 else word[:39] + "…"
        raise UsageError(
            f"unknown command {word}", hint=f"(/help lists them; /{word} sends it as a message)"
        )
    return COMMAND_NAMED[word][3], unquoted(rest[0].strip()) if rest else None


def banner(chat: Chat) -> str:
    """Lines of at most 80 columns: what answers, and which conversation this is."""
    settings, conversation = chat.settings, chat.conversation
    lines = [f"chat.py {__version__} · {settings.model} at {chat.server.host}"]
    if settings.model == DEFAULT_MODEL and not is_openai_host(chat.server.base_url):
        lines.append("(the model name is chat.py's default: --models lists the server's)")
    state = plural(len(conversation.turns), "turn") if conversation.turns else "new"
    parts = [
        f"conversation {conversation.name}",
        state + ("" if conversation.save else ", nothing is saved"),
        f"/help · {leaving_keys()} leaves",
    ]
    together = " · ".join(parts)
    lines += [together] if len(together) <= BANNER_CHARS else [parts[0], " · ".join(parts[1:])]
    return "\n".join(
        line if len(line) <= BANNER_CHARS else line[: BANNER_CHARS - 1] + "…" for line in lines
    )


def enable_line_editing(history: str) -> int | None:
    """Readline with its history, and bracketed paste (a pasted block is one message). Returns
    None without readline, 0 for libedit (no bracketed paste), else GNU readline's version."""
    try:
        import readline
    except ImportError:
        return None
    try:
        for line in read_private(history).decode("utf-8", "replace").splitlines():
            readline.add_history(line)
    except (UsageError, ValueError):  # readline refuses a NUL
        pass  # no history yet, or a file chat.py will not read
    if "libedit" in (readline.__doc__ or ""):
        return 0
    readline.parse_and_bind("set enable-bracketed-paste on")
    return getattr(readline, "_READLINE_RUNTIME_VERSION", 1)


def save_history(history: str, env: Env) -> None:
    """The last lines typed, in a private file (not pasted blocks: they would come back as many)."""
    try:
        import readline
    except ImportError:
        return  # no readline (Windows): plain lines, no history

    count = readline.get_current_history_length()
    lines = [
        line
        for line in map(readline.get_history_item, range(1, count + 1))
        if line and "\n" not in line
    ]
    try:
        check_folder(os.path.dirname(history))
        make_folder(os.path.dirname(history))
        fd = open_private(history, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        make_private(fd)
        # a byte typed that is no UTF-8 reached input() as a surrogate: written back as it was
        with open(fd, "w", encoding="utf-8", errors="surrogateescape") as file:
            file.write("".join(line + "\n" for line in lines[-HISTORY_LINES:]))
    except (OSError, UsageError) as exc:
        env.warn(
            f"could not save the line history to {history}: {getattr(exc, 'strerror', None) or exc}"
        )


def read_message(env: Env, on_terminal: bool) -> tuple[str, bool]:
    """A line, a pasted block, or the lines between two \"\"\" lines, and whether it was one
    line typed (only that can be a command); prompts go to the terminal (to input() when fd 1
    is one)."""

    def read_line(prompt: str) -> str:
        if not on_terminal:
            env.stderr.write(prompt)
            env.stderr.flush()
        return env.read_line(prompt if on_terminal else "")

    line = read_line("> ")
    if line.strip() != '"""':
        if "\n" in line:  # a paste keeps its indentation
            return line.strip("\n"), False
        return line.strip(), True
    lines = []
    while (line := read_line("... ")).strip() != '"""':
        lines.append(line)
    return "\n".join(lines).strip("\n"), False


def converse(chat: Chat, attached: list[tuple], detail: str | None) -> int:
    """The conversation mode: read a message, send the whole conversation, show the reply."""
    env, history = chat.env, os.path.join(chat.conversation.folder, HISTORY_FILE)
    shown = env.stdout_tty or env.stderr_tty  # where readline can show the line
    editing = enable_line_editing(history) if env.read_line is input and shown else None
    if editing is not None and not env.stdout_tty:
        # input() edits only when fd 1 is a terminal: fd 1 becomes stderr's for the whole
        # conversation, and the replies go to a copy of the redirected stdout.
        env.stdout = open(os.dup(1), "w", encoding="utf-8", errors="replace")  # noqa: SIM115
        os.dup2(2, 1)
    env.say(banner(chat))
    talk = Talk(chat, attached, detail, sys.stdout if editing else None)
    try:
        while True:
            try:
                line, typed = read_message(env, env.stdout_tty or editing is not None)
            except KeyboardInterrupt:  # as in a shell: the line (or block) is dropped
                env.stderr.write("\n")
                continue
            except EOFError:
                if (editing or 0) < 0x0802:  # GNU readline 8.2 ends the line after Ctrl-D itself
                    env.stderr.write("\n")  # the shell's prompt starts on a line of its own
                return ExitStatus.OK
            if line.strip().lower() in ("exit", "quit"):
                return ExitStatus.OK
            try:
                handler, argument = parse_command(line) if typed else (None, None)
                if handler and handler(talk, argument):
                    return ExitStatus.OK
            except UsageError as exc:
                env.error(exc)
                continue
            if not handler and line.strip():
                talk.ask_message(line[1:] if line.startswith("//") else line)
    finally:
        if editing is not None and chat.conversation.save:
            save_history(history, env)


if __name__ == "__main__":
    sys.exit(main())

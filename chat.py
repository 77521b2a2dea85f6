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

    $ python chat.py "Write a haiku about APIs."
    $ python chat.py -c "Now one about HTTP."          # go on from the last question
    $ git diff | python chat.py "Review this"
    $ python chat.py --image cat.jpg "What is in this picture?"
    $ python chat.py --stream --base-url http://127.0.0.1:8080/v1 "Explain APIs"
    $ python chat.py                      # no question on a terminal: a conversation
    $ python chat.py --image missing.jpg "What is this?"
    error: cannot read image missing.jpg: No such file or directory

The reply goes to stdout; reasoning, warnings and errors go to stderr. Exit codes:
0 reply printed, 1 API error, 2 usage or input error, 3 network failure,
4 timeout, 130 interrupted. Every answered question is saved (see --chats).
"""

from __future__ import annotations

import signal

if __name__ == "__main__":
    # Ctrl-C during the imports below would end in a traceback; until main() hands SIGINT
    # back to Python, it just ends the process (the shell reports 130).
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import argparse
import json
import os
import re
import sys
import time
import warnings
from enum import IntEnum
from urllib.parse import urlsplit

# requests (with urllib3) is imported inside the functions that talk to a server, so that the
# commands that need none (--help, --chats, --show, --curl, usage errors) start without it.

__version__ = "2.0.0"

DEFAULT_MODEL = "gpt-5.4-mini"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
# Seconds to wait for each read: a reasoning model, or a local model on a CPU, can be silent
# for minutes (600 s is the official OpenAI SDK's default). Connecting never needs that long.
DEFAULT_TIMEOUT = 600.0
CONNECT_TIMEOUT = 15.0
DEFAULT_RETRIES = 2
USER_AGENT = f"chat.py/{__version__}"

INITIAL_RETRY_DELAY = 0.5  # seconds; doubles on each retry
MAX_RETRY_DELAY = 8.0  # seconds
MAX_RETRY_AFTER = 120.0  # seconds; a server asking for longer gets no retry
RETRY_STATUSES = {408, 409, 429}  # and every 5xx

# Detail level -> how many pixels of a local image are worth uploading.
# "low" is seen as one 512x512 thumbnail; "high" (and "auto", the default)
# keeps at most 2048 px on the long side and 1536 patches of 32x32 pixels.
LOW_DETAIL_BOX = 512
HIGH_DETAIL_LONG_SIDE = 2048
HIGH_DETAIL_PIXELS = 1536 * 32 * 32
JPEG_QUALITY = 85
# The formats the API takes as they are, and their plain 8-bit modes: a file like this can be
# sent byte for byte (16-bit, CMYK and other modes are converted).
AS_IS_MODES = {
    "PNG": {"1", "L", "LA", "P", "RGB", "RGBA"},
    "GIF": {"1", "L", "LA", "P", "RGB", "RGBA"},
    "WEBP": {"1", "L", "LA", "P", "RGB", "RGBA"},
    "JPEG": {"L", "RGB"},
}

TEXT_SNIFF_BYTES = 8192  # a NUL byte this early means a -f file is not text
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".heic")

NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
# A retried turn's line starts with this, so --chats can count turns without parsing lines.
RETRY_LINE_START = b'{"retry": true'

READ_SIZE = 64 * 1024  # most bytes taken from the socket per read while streaming
LINE_CHARS = 300  # the longest error: or warning: line
TRACE_STRING_CHARS = 500  # -v cuts longer strings of a JSON body
TRACE_TEXT_CHARS = 2000  # -v cuts a longer body that is not JSON
DATA_URL = re.compile(r"(data:[\w.+-]+/[\w.+-]+;base64,)([A-Za-z0-9+/=]+)")
BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{100,}={0,2}")
# Keys shorter than this are placeholders ("none", "x") that local servers
# accept; masking them would garble every message that contains the letters.
MIN_SECRET_CHARS = 8
DIM, NORMAL = "\x1b[2m", "\x1b[0m"  # how reasoning is shown on a terminal


class ExitStatus(IntEnum):
    """Exit codes of chat.py, as documented in the README."""

    OK = 0
    API_ERROR = 1
    USAGE = 2
    NETWORK = 3
    TIMEOUT = 4
    INTERRUPTED = 130


class ChatError(Exception):
    """A failure chat.py explains in one line; the class picks the exit code.
    The hint is advice that stays whole when a long message is cut to fit the line."""

    exit_status = ExitStatus.API_ERROR

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


class UsageError(ChatError):
    exit_status = ExitStatus.USAGE


class NetworkError(ChatError):
    exit_status = ExitStatus.NETWORK


class TimedOut(ChatError):
    exit_status = ExitStatus.TIMEOUT


class ApiError(ChatError):
    """The server answered, but not with a usable reply."""

    def __init__(self, message: str, hint: str = "", retryable: bool = False,
                 retry_after: float | None = None):
        super().__init__(message, hint)
        self.retryable = retryable
        self.retry_after = retry_after


# Plain classes, not dataclasses: importing dataclasses (and with it inspect) would cost
# about a seventh of chat.py's start-up.


class Settings:
    """What the user asked for, apart from the question: the request body's fields and how
    to show the reply."""

    def __init__(self, model: str, base_url: str, system: str | None = None,
                 temperature: float | None = None, max_tokens: int | None = None,
                 reasoning_effort: str | None = None, options: list[tuple[str, object]] = (),
                 stream: bool = False, usage: bool = False, show_reasoning: bool = False,
                 verbose: bool = False):
        self.model = model
        self.base_url = base_url  # decides the name of the max-tokens field
        self.system = system
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.reasoning_effort = reasoning_effort
        self.options = options  # -o KEY VALUE pairs, applied last
        self.stream = stream
        self.usage = usage
        self.show_reasoning = show_reasoning
        self.verbose = verbose


class Connection:
    """Where requests go, with which key, and how long and how often to try."""

    def __init__(self, base_url: str, key: str, timeout: float, retries: int):
        self.base_url = base_url
        self.key = key
        self.timeout = timeout
        self.retries = retries


class Reply:
    """What the server answered: the text, the reasoning, why it stopped, the token usage."""

    def __init__(self, text: str = "", reasoning: str = "", finish_reason: str | None = None,
                 usage: dict | None = None, streamed: bool = False):
        self.text = text
        self.reasoning = reasoning
        self.finish_reason = finish_reason
        self.usage = usage
        self.streamed = streamed
        self.done = False  # the stream said [DONE]


class Conversation:
    """A conversation's turns so far, and the file the next one is appended to."""

    def __init__(self, folder: str, name: str, turns: list[dict] | None = None, save: bool = True):
        self.folder = folder
        self.name = name
        self.turns = turns or []
        self.save = save

    @property
    def path(self) -> str:
        return conversation_file(self.folder, self.name)

    def add(self, turn: dict, retry: bool = False, key: str = "") -> None:
        """Keep a finished turn; a retry replaces the turn before it. Saving never costs
        the reply: a failure to write is a warning."""
        if retry:
            self.turns.pop()
        self.turns.append(turn)
        if self.save:
            try:
                append_line(self.folder, self.path, {"retry": True, **turn} if retry else turn, key)
            except OSError as exc:
                warn(f"could not save the conversation to {self.path}: {exc.strerror or exc}")


# ---------------------------------------------------------------- builders


def build_question(words: list[str], piped: str | None, files: list[str] = ()) -> str:
    """The question words, then piped text, then files, each part after a blank line."""
    question = " ".join(words).strip()
    # Keep the indentation of piped text's first line; drop blank lines around it.
    piped = (piped or "").rstrip().lstrip("\r\n")
    return "\n\n".join(part for part in (question, piped, *files) if part)


def read_text_file(path: str) -> str:
    """A -f file's text, as UTF-8; a missing, unreadable or binary file is a usage error."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise UsageError(f"cannot read file {path}: {exc.strerror or exc}") from None
    if b"\0" in data[:TEXT_SNIFF_BYTES]:
        is_picture = path.lower().endswith(IMAGE_SUFFIXES)
        raise UsageError(f"cannot add {path}: it is not a text file (it holds NUL bytes)",
                         hint="(attach pictures with --image)" if is_picture else "")
    return decode_utf8(data, path)


def decode_utf8(data: bytes, source: str) -> str:
    """Text as UTF-8; undecodable bytes are replaced, with a warning. A leading BOM is dropped."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        warn(f"{source} is not UTF-8 (byte {data[exc.start]:#04x} at offset {exc.start}); "
             "undecodable bytes were replaced with U+FFFD")
        text = data.decode("utf-8", "replace")
    return text.removeprefix("\ufeff")


def file_block(path: str, text: str) -> str:
    """The path, then the text in a code fence longer than any run of backticks inside it."""
    longest = max((len(run) for run in re.findall("`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    if text and not text.endswith("\n"):
        text += "\n"
    return f"{path}\n{fence}\n{text}{fence}"


def build_user_message(question: str, image_urls: list[str], detail: str | None) -> dict:
    """The user message: plain text, or a text part followed by one part per image."""
    if not image_urls:
        return {"role": "user", "content": question}
    parts = [{"type": "text", "text": question}]
    for url in image_urls:
        image = drop_nones({"url": url, "detail": detail})
        parts.append({"type": "image_url", "image_url": image})
    return {"role": "user", "content": parts}


def build_messages(turns: list[dict], user_message: dict, system: str | None) -> list[dict]:
    """The messages of one request: the system prompt, the earlier turns, the new question."""
    messages = [{"role": "system", "content": system}] if system else []
    for turn in turns:
        messages += [turn["user"], {"role": "assistant", "content": turn["assistant"]}]
    return messages + [user_message]


def build_body(settings: Settings, messages: list[dict]) -> dict:
    """The chat-completions request body, holding only the fields that were asked for."""
    body = drop_nones({
        "model": settings.model,
        "messages": messages,
        "temperature": settings.temperature,
        max_tokens_field(settings.base_url): settings.max_tokens,
        "reasoning_effort": settings.reasoning_effort,
        "stream": True if settings.stream else None,
        # Only with -u: some servers reject the field.
        "stream_options": {"include_usage": True} if settings.stream and settings.usage else None,
    })
    for key, value in settings.options:
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return body


def parse_options(pairs: list[list[str]]) -> list[tuple[str, object]]:
    """-o KEY VALUE pairs, VALUE as JSON when it parses (null: leave KEY out), else as text."""
    for key, _ in pairs:
        if key in ("messages", "stream"):
            raise UsageError(f"-o {key}: chat.py builds '{key}' itself")
    return [(key, json_or_text(text)) for key, text in pairs]


def json_or_text(text: str):
    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    try:
        return json.loads(text, parse_constant=refuse)
    except ValueError:
        return text


def drop_nones(mapping: dict) -> dict:
    return {key: value for key, value in mapping.items() if value is not None}


def is_openai_host(base_url: str) -> bool:
    """OpenAI's own hosts and Azure's, which need a key and reject max_tokens."""
    host = urlsplit(base_url).hostname or ""
    return host == "api.openai.com" or host.endswith(
        (".api.openai.com", ".openai.azure.com", ".cognitiveservices.azure.com",
         ".services.ai.azure.com"))


def max_tokens_field(base_url: str) -> str:
    """OpenAI's hosts reject max_tokens for current models; other servers may only know it."""
    return "max_completion_tokens" if is_openai_host(base_url) else "max_tokens"


def api_url(base_url: str, path: str) -> str:
    """base_url + path; a query string in base_url (Azure's ?api-version=) stays at the end."""
    parts = urlsplit(base_url)
    return parts._replace(path=parts.path.rstrip("/") + path, fragment="").geturl()


def public_url(base_url: str) -> str:
    """base_url without user, password or query: what may be written to a file."""
    parts = urlsplit(base_url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def check_base_url(base_url: str) -> None:
    parts = urlsplit(base_url)
    try:
        port_ok = parts.port != 0  # .port raises for a port that is not a number, or too large
    except ValueError:
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise UsageError(f"--base-url must be an http:// or https:// URL, not {base_url!r}")


def check_api_key(key: str) -> None:
    # requests would refuse such a header, quoting it (and so the key) in its error.
    if not key.isascii() or not key.isprintable() or " " in key:
        raise UsageError(
            "OPENAI_API_KEY holds spaces, control or non-ASCII characters; check its value"
        )


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bearer_auth(key: str):
    """A requests auth callable. Unlike headers=, auth= is not replaced by a ~/.netrc entry."""

    def add_authorization(request):
        request.headers["Authorization"] = f"Bearer {key}"
        return request

    return add_authorization


def redact(text: str, key: str) -> str:
    if len(key) >= MIN_SECRET_CHARS:
        return text.replace(key, "[redacted]")
    return text


def mask_key(key: str) -> str:
    """What the verbose trace shows of a key: its sk- prefix and at most the last 4 characters."""
    prefix = "sk-" if key.startswith("sk-") else ""
    tail = key[-4:] if len(key) >= 16 else ""
    return f"{prefix}…{tail}"


def elide_base64(text: str) -> str:
    """text with each data: URL's payload, and any other long Base64 run, cut to its length."""
    text = DATA_URL.sub(lambda match: f"{match[1]}…({len(match[2]):,} characters)", text)
    return BASE64_RUN.sub(lambda match: f"…({len(match[0]):,} characters of Base64)", text)


def one_line(message: str, key: str = "", room: int = LINE_CHARS) -> str:
    """A message as one readable line of at most room characters: the key redacted first,
    then Base64 elided, line breaks and runs of spaces made single spaces, the rest cut."""
    text = " ".join(elide_base64(redact(message, key)).split())
    return text if len(text) <= room else text[: room - 1] + "…"


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


def image_url(source: str, detail: str | None) -> tuple[str, str]:
    """The URL to send for --image (remote and data: URLs as given, local files inlined),
    and a line for -v saying what is sent and why."""
    if source.startswith(("http://", "https://", "data:")):
        return source, f"image {elide_base64(source)}: sent as given"
    return encode_image_file(source, detail)


def encode_image_file(path: str, detail: str | None) -> tuple[str, str]:
    """A local image as a data: URL: shrunk to what the model keeps at this detail, or the
    file's own bytes when the API takes them as they are and they are no larger."""
    from PIL import Image, ImageOps  # Pillow is imported only when an image is attached

    try:
        with warnings.catch_warnings():
            # Pillow only warns between 89 and 179 megapixels; any of those is a bomb to us.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                source = f"{image.width}x{image.height} {image.format} {image.mode}"
                kind, reason = image.format, why_not_as_is(image)
                prepared = ImageOps.exif_transpose(shrink_image(image, detail))
                mime, data = encode_image(prepared)
                size = os.path.getsize(path)
                original = read_bytes(path) if reason is None and size <= len(data) else None
    except Image.UnidentifiedImageError:
        raise UsageError(f"cannot decode image {path}: not an image format Pillow knows") from None
    except OSError as exc:
        if exc.strerror:  # the file itself: missing, a directory, no permission
            raise UsageError(f"cannot read image {path}: {exc.strerror}") from None
        raise UsageError(f"cannot decode image {path}: {exc}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UsageError(f"image {path} is too large (over {Image.MAX_IMAGE_PIXELS:,} pixels)") from None
    except Exception as exc:  # Pillow's decoders raise many types on damaged files
        raise UsageError(f"cannot decode image {path}: {exc}") from None
    if original is not None:
        sent = f"sent as it is (re-encoded it would take {len(data):,} bytes)"
        mime, data = Image.MIME[kind], original
    else:
        sent = (f"sent {prepared.width}x{prepared.height} {mime.split('/')[1].upper()}, "
                f"{len(data):,} bytes ({reason or 'smaller than the file'})")
    note = f"image {path}: {source}, {size:,} bytes; {sent}"
    return f"data:{mime};base64,{base64_text(data)}", note


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def base64_text(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode("ascii")


def why_not_as_is(image) -> str | None:
    """Why the file's own bytes cannot be sent as they are, or None when they can (if they
    are no larger than the prepared image: lossless, and the server sees the same pixels)."""
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
    """Downscale (never upscale) to fit_size, working in the stored orientation so that
    the image shown after the EXIF rotation is the size fit_size chose."""
    from PIL import Image

    orientation = image.getexif().get(0x0112, 1)
    turned = orientation in (5, 6, 7, 8)  # these orientations swap width and height
    shown_size = image.size[::-1] if turned else image.size
    target = fit_size(shown_size, detail)
    stored_target = target[::-1] if turned else target
    if stored_target != image.size:
        # JPEG only: decode at 1/2, 1/4 or 1/8 scale when that still covers the target.
        image.draft(None, stored_target)
        image = image.resize(stored_target, Image.Resampling.BICUBIC)
    return image


def encode_image(image) -> tuple[str, bytes]:
    """Encode as JPEG, or as PNG when some pixel is transparent."""
    import io

    buffer = io.BytesIO()
    if has_transparency(image):
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


def has_transparency(image) -> bool:
    if "A" not in image.getbands() and "transparency" not in image.info:
        return False
    alpha = image.convert("RGBA").getchannel("A")
    return alpha.getextrema()[0] < 255


# ---------------------------------------------------------- conversations


def state_dir() -> str:
    """Where conversations are saved: $CHAT_PY_HOME, else $XDG_STATE_HOME/chat-py (only an
    absolute path counts, as the XDG spec says), else ~/.local/state/chat-py."""
    if os.environ.get("CHAT_PY_HOME"):
        return os.environ["CHAT_PY_HOME"]
    xdg_state = os.environ.get("XDG_STATE_HOME", "")
    if os.path.isabs(xdg_state):
        return os.path.join(xdg_state, "chat-py")
    return os.path.join(os.path.expanduser("~"), ".local", "state", "chat-py")


def conversation_file(folder: str, name: str) -> str:
    return os.path.join(folder, f"{name}.jsonl")


def check_name(name: str) -> str:
    """A conversation name, checked before any file is touched: it can never become a path."""
    name = name.removesuffix(".jsonl")
    if not NAME_PATTERN.fullmatch(name):
        raise UsageError(f"{name!r} is not a conversation name: use up to 64 letters, digits, "
                         "'.', '_' or '-', not starting with '.'")
    return name


def new_name(folder: str) -> str:
    """A fresh conversation name that sorts by time, such as 20261126-191002-a3f."""
    while True:
        name = time.strftime("%Y%m%d-%H%M%S-") + os.urandom(2).hex()[:3]
        if not os.path.exists(conversation_file(folder, name)):
            return name


def saved_conversations(folder: str) -> list[tuple[int, str]]:
    """(modification time, name) of each saved conversation, the newest first."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise UsageError(f"cannot read the conversations in {folder}: {exc.strerror}") from None
    found = [(entry.stat().st_mtime_ns, entry.name.removesuffix(".jsonl")) for entry in entries
             if entry.name.endswith(".jsonl") and entry.is_file()]
    return sorted(found, reverse=True)


def conversation_path(folder: str, name: str) -> str:
    """The file of an existing conversation; an unknown name is a usage error."""
    path = conversation_file(folder, check_name(name))
    if not os.path.isfile(path):
        raise UsageError(f"no conversation named {name!r} in {folder}",
                         hint="(python chat.py --chats lists them)")
    return path


def newest_conversation(folder: str) -> str:
    saved = saved_conversations(folder)
    if not saved:
        raise UsageError(f"no saved conversation in {folder} yet: ask a question first")
    return saved[0][1]


def open_conversation(args: argparse.Namespace, folder: str, save: bool) -> Conversation:
    """The conversation this run goes on with (-c, --chat NAME), or a new one."""
    if args.continue_ and args.chat is not None:
        raise UsageError("-c and --chat cannot go together: -c continues the newest conversation")
    if not args.continue_ and args.chat is None:
        return Conversation(folder, new_name(folder), save=save)
    name = check_name(args.chat) if args.chat is not None else newest_conversation(folder)
    conversation = Conversation(folder, name, save=save)
    if os.path.isfile(conversation.path):
        conversation.turns = load_turns(conversation.path)
    return conversation


def load_turns(path: str) -> list[dict]:
    """The turns of a saved conversation. A line that is not a turn (a torn write, a bad hand
    edit) is skipped with a warning; a retried turn replaces the one before it."""
    turns = []
    try:
        with open(path, "rb") as file:
            lines = list(file)  # split at b"\n" only: U+2028 in a reply is no line break
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            turn = json.loads(line)
        except ValueError:
            turn = None
        if not (isinstance(turn, dict) and isinstance(turn.get("user"), dict)
                and isinstance(turn.get("assistant"), str)):
            warn(f"{path} line {number} is not a saved turn (a torn write or a bad edit?); skipped")
            continue
        if turn.pop("retry", False) and turns:
            turns.pop()
        turns.append(turn)
    return turns


def append_line(folder: str, path: str, turn: dict, key: str) -> None:
    """Append a turn as one line with one write, then fsync; files are never rewritten.
    The folder is made 0700 and the file 0600, whatever the umask; the key is never written,
    even when a server echoes it back."""
    if not os.path.isdir(folder):
        os.makedirs(folder, mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)
    data = (redact(json.dumps(turn, ensure_ascii=False), key) + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        os.fchmod(fd, 0o600)  # whatever the umask
    except FileExistsError:
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data  # never glue a turn onto a torn last line
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def make_turn(settings: Settings, body: dict, user_message: dict, reply: Reply) -> dict:
    """A turn as it is saved: when, which model and server, the question as sent, the answer."""
    return drop_nones({
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": body.get("model"),
        "system": settings.system or None,
        "user": user_message,
        "assistant": reply.text,
        "finish_reason": reply.finish_reason,
        "usage": reply.usage,
        "base_url": public_url(settings.base_url),
    })


def list_conversations(folder: str) -> None:
    """--chats: one line per conversation, newest first."""
    saved = saved_conversations(folder)
    if not saved:
        print(f"no saved conversations in {folder}", file=sys.stderr)
        return
    width = max(len(name) for _, name in saved)
    for mtime, name in saved:
        turns, question = summarize(conversation_file(folder, name))
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(mtime / 1e9))
        count = f"{turns} turn" + ("" if turns == 1 else "s")
        print(f"{name:<{width}}  {count:>9}  {when}  {question}")


def summarize(path: str) -> tuple[int, str]:
    """A conversation's turn count and the start of its first question. Lines are counted as
    bytes; only the first is parsed."""
    with open(path, "rb") as file:
        first = file.readline()
        file.seek(0)
        turns = sum(1 for line in file if line.strip() and not line.startswith(RETRY_LINE_START))
    try:
        question = message_text(json.loads(first)["user"]["content"]) or ""
    except (ValueError, KeyError, TypeError):
        question = "?"
    return turns, one_line(question, room=60)


def show_conversation(path: str) -> None:
    """--show: the conversation for a person to read, each question and answer in order."""
    turns = load_turns(path)
    name = os.path.basename(path).removesuffix(".jsonl")
    print(f"conversation {name}: {len(turns)} turn" + ("" if len(turns) == 1 else "s"))
    system = None
    for turn in turns:
        if turn.get("system") != system:
            system = turn.get("system")
            print(f"\nsystem prompt: {system or '(none)'}")
        print(f"\nyou, {local_time(turn.get('time'))}:\n{readable(turn['user'])}")
        print(f"\n{turn.get('model') or 'assistant'}:\n{turn['assistant']}")


def readable(message: dict) -> str:
    """A user message as text, with each image as an [image: URL] line, Base64 elided."""
    content = message.get("content")
    parts = content if isinstance(content, list) else []
    images = [part.get("image_url") for part in parts
              if isinstance(part, dict) and part.get("type") == "image_url"]
    urls = [image.get("url") if isinstance(image, dict) else image for image in images]
    lines = [message_text(content) or ""] + [f"[image: {elide_base64(str(url))}]" for url in urls]
    return "\n".join(lines)


def local_time(stamp: str | None) -> str:
    from datetime import datetime

    try:
        when = datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        return str(stamp)
    return when.astimezone().strftime("%Y-%m-%d %H:%M")


def forget_conversation(path: str) -> None:
    try:
        os.remove(path)
    except OSError as exc:
        raise UsageError(f"cannot delete {path}: {exc.strerror}") from None
    print(f"forgot {os.path.basename(path).removesuffix('.jsonl')} (deleted {path})")


# ------------------------------------------------------------- transport


def request(session, conn: Connection, path: str, body: dict | None, read, output=None,
            trace=None):
    """Send one request (POST with a body, else GET) and return read(response, streamed).
    Retry what a retry can fix, as long as no text of the reply has been shown."""
    import requests

    for attempt in range(conn.retries + 1):
        if output:
            output.wait()
        try:
            response = session.request(
                "GET" if body is None else "POST",
                api_url(conn.base_url, path),
                json=body,
                headers={"User-Agent": USER_AGENT},
                auth=bearer_auth(conn.key) if conn.key else None,
                timeout=(min(CONNECT_TIMEOUT, conn.timeout), conn.timeout),
                stream=True,  # return at the headers; the body is read below
            )
            streamed = response.ok and is_event_stream(response, asked=bool(body and body.get("stream")))
            if trace:
                trace.exchange(response, with_body=not streamed)
            if response.status_code >= 400:
                raise api_error(response)
            return read(response, streamed)
        except (ApiError, requests.RequestException) as exc:
            error = exc if isinstance(exc, ChatError) else as_chat_error(exc, conn.timeout)
            wait = None if output and output.started else retry_wait(exc, attempt, conn.retries)
            if wait is None:
                if isinstance(error, TimedOut) and body and body.get("reasoning_effort"):
                    error.hint = "(a long think may need --stream or a larger --timeout)"
                if error is exc:
                    raise
                raise error from exc
            if output:
                output.stop_waiting()
            retrying = f"; retrying in {wait:.1f} s (attempt {attempt + 2} of {conn.retries + 1})"
            warn(str(error), conn.key, retrying)
            time.sleep(wait)
    raise AssertionError("unreachable: the last attempt returns or raises")


def is_event_stream(response, asked: bool) -> bool:
    """Whether the body is Server-Sent Events: what its Content-Type says, else what we asked for.
    (Some servers answer a streaming request with one JSON reply, or the other way round.)"""
    content_type = response.headers.get("Content-Type", "")
    if "text/event-stream" in content_type:
        return True
    return asked and "json" not in content_type


def retry_wait(exc: Exception, attempt: int, retries: int) -> float | None:
    """Seconds to wait before retrying after exc, or None to give up."""
    if attempt >= retries:
        return None
    if isinstance(exc, ApiError):
        if not exc.retryable:
            return None
        if exc.retry_after is not None:
            return exc.retry_after
    elif not is_transient(exc):
        return None
    return backoff_delay(attempt)


def is_transient(exc: Exception) -> bool:
    """Network failures worth another try: not TLS errors, not bad URLs or headers."""
    import requests

    if isinstance(exc, requests.exceptions.SSLError) or speaks_no_http(exc):
        return False
    return isinstance(
        exc, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)
    )


def backoff_delay(attempt: int, rand=None) -> float:
    """0.5 s, 1 s, 2 s ... capped at 8 s, times a random factor in [0.75, 1]."""
    import random

    delay = min(INITIAL_RETRY_DELAY * 2**attempt, MAX_RETRY_DELAY)
    return delay * (1 - 0.25 * (rand or random.random)())


def parse_retry_after(headers, now: float | None = None) -> float | None:
    """Seconds the server asks us to wait: retry-after-ms, else Retry-After in seconds or as an
    HTTP date; None when it says nothing usable."""
    import email.utils
    import math

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
    when = time.localtime(time.time() + min(seconds, 10**9))  # localtime() overflows on absurd waits
    return time.strftime("%Y-%m-%d %H:%M:%S" if seconds > 12 * 3600 else "%H:%M:%S", when)


def api_error(response) -> ApiError:
    """An ApiError for an HTTP error status, saying what the server said and whether to retry."""
    status = f"HTTP {response.status_code} {status_reason(response)}"
    error = error_payload(response)
    message = error.get("message") or error_snippet(response)
    text = f"{status}: {message}" if message and message.lower() not in status.lower() else status
    if "insufficient_quota" in (error.get("code"), error.get("type")):
        return ApiError(text, hint="(the account is out of quota: add credit, retrying will not help)")
    hint = ""
    if response.status_code == 404:
        hint = ("(this server lists no models at BASE_URL/models)"
                if urlsplit(response.url).path.endswith("/models") else
                "(requests go to BASE_URL/chat/completions: check --base-url, and --model "
                "against what python chat.py --models lists)")
    should_retry = response.headers.get("x-should-retry", "").lower()
    if should_retry in ("true", "false"):
        retryable = should_retry == "true"
    else:
        retryable = response.status_code in RETRY_STATUSES or response.status_code >= 500
    wait = parse_retry_after(response.headers)
    if retryable and wait is not None and wait > MAX_RETRY_AFTER:
        return ApiError(text, hint=f"(the server asks to wait {wait:.0f} s: "
                                   f"try again after {clock_after(wait)})")
    return ApiError(text, hint, retryable=retryable, retry_after=wait)


def status_reason(response) -> str:
    import http

    if response.reason:
        return response.reason
    try:
        return http.HTTPStatus(response.status_code).phrase
    except ValueError:
        return ""


def error_payload(response) -> dict:
    """The error object of an OpenAI-style JSON error body, or {}."""
    try:
        body = response.json()
    except ValueError:
        return {}
    if not isinstance(body, dict):
        return {}
    error = body.get("error", body)
    if isinstance(error, str):
        return {"message": error}
    if not isinstance(error, dict):
        return {}
    message = error.get("message") or error.get("detail")
    return {**error, "message": message if isinstance(message, str) else None}


def error_snippet(response) -> str:
    """The text of a body that is not the JSON expected, without HTML markup."""
    text = response.content[: 64 * 1024].decode("utf-8", "replace")
    title = re.search(r"<title[^>]*>(.*?)</title>", text, re.I | re.S)
    if title:
        text = title.group(1)
    text = re.sub(r"<(script|style)\b.*?</\1>|<[^>]*>", " ", text, flags=re.I | re.S)
    return " ".join(text.split())


def as_chat_error(exc: Exception, timeout: float) -> ChatError:
    """The ChatError (its exit code and one-line message) for what requests raised."""
    import requests

    host = host_of(exc)
    if is_timeout(exc):
        if isinstance(exc, requests.ConnectTimeout):
            return TimedOut(f"could not connect to {host} within {min(CONNECT_TIMEOUT, timeout):g} s")
        return TimedOut(f"{host} did not answer within {timeout:g} s (--timeout)")
    if isinstance(exc, requests.exceptions.InvalidSchema) and "SOCKS" in str(exc):
        return UsageError("a socks5:// proxy is set in the environment (ALL_PROXY, HTTPS_PROXY), "
                          "but PySocks is not installed", hint="(pip install 'requests[socks]')")
    if isinstance(exc, requests.exceptions.SSLError):
        return NetworkError(f"TLS failure talking to {host}: {root_cause(exc)}")
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return NetworkError(f"the connection to {host} broke off mid-reply: {root_cause(exc)}")
    if isinstance(exc, requests.exceptions.ContentDecodingError):
        return ApiError(f"cannot decode the reply from {host}: {root_cause(exc)}")
    if isinstance(exc, requests.TooManyRedirects):
        return ApiError(f"too many redirects from {host}")
    if speaks_no_http(exc):
        return ApiError(f"{host} did not answer in HTTP: {root_cause(exc)!r}")
    if isinstance(exc, requests.ConnectionError):
        import socket

        if isinstance(innermost(exc), socket.gaierror):
            return NetworkError(f"cannot resolve host {host}: {root_cause(exc)}")
        return NetworkError(f"cannot reach {host}: {root_cause(exc)}")
    return NetworkError(f"request to {host} failed: {root_cause(exc)}")


def is_timeout(exc: Exception) -> bool:
    """True for timeouts, including a read timeout while iterating a body, which
    requests reports as a ConnectionError wrapping urllib3's ReadTimeoutError.
    (urllib3 2's NewConnectionError subclasses ConnectTimeoutError, so a refused
    connection is told apart by requests, not by checking urllib3's classes here.)"""
    import requests
    import urllib3

    if isinstance(exc, requests.Timeout):
        return True
    return isinstance(exc, requests.ConnectionError) and any(
        isinstance(arg, urllib3.exceptions.ReadTimeoutError) for arg in exc.args
    )


def speaks_no_http(exc: Exception) -> bool:
    """True when the server sent something that is not HTTP (but did not just hang up)."""
    import http.client

    cause = innermost(exc)
    return isinstance(cause, http.client.HTTPException) and not isinstance(cause, ConnectionError)


def host_of(exc: Exception) -> str:
    request = getattr(exc, "request", None)
    url = getattr(request, "url", None)
    return urlsplit(url).netloc if url else "the server"


def root_cause(exc: BaseException) -> str:
    """The innermost error's message: "Connection refused", not urllib3's wrapping of it."""
    exc = innermost(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def innermost(exc: BaseException) -> BaseException:
    """Follow requests' and urllib3's wrapping (args[0], .reason, __cause__) to the original error."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "reason", None)
        if not isinstance(inner, BaseException) and exc.args and isinstance(exc.args[0], BaseException):
            inner = exc.args[0]
        inner = inner if isinstance(inner, BaseException) else exc.__cause__ or exc.__context__
        if inner is None:
            break
        exc = inner
    return exc


# --------------------------------------------------------------- replies


def response_json(response):
    try:
        return response.json()
    except ValueError:
        raise ApiError(f"the server's reply is not JSON: {error_snippet(response)!r}") from None


def read_reply(response) -> Reply:
    """The reply of a non-streamed completion."""
    payload = response_json(response)
    if not isinstance(payload, dict):
        raise ApiError("unexpected reply from the server: not a JSON object")
    if "error" in payload and "choices" not in payload:
        message = error_payload(response).get("message") or error_snippet(response)
        raise ApiError(f"the server reported an error: {message}")
    choices = payload.get("choices")
    if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
        raise ApiError("unexpected reply from the server: no choices")
    message = choices[0].get("message")
    if not isinstance(message, dict):
        raise ApiError("unexpected reply from the server: no message in choices[0]")
    text = message_text(message.get("content"))
    if text is None:
        text = message_text(message.get("refusal"))
    if text is None:
        raise ApiError("unexpected reply from the server: the message has no text")
    return Reply(text, reasoning_text(message), choices[0].get("finish_reason"), payload.get("usage"))


def message_text(content) -> str | None:
    """Text from a message's content: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [part.get("text") for part in content if isinstance(part, dict)]
        return "".join(text for text in texts if isinstance(text, str))
    return None


def reasoning_text(message: dict) -> str:
    """A message's or delta's reasoning: reasoning_content (DeepSeek, llama.cpp), else
    reasoning (vLLM, Ollama, OpenRouter)."""
    for name in ("reasoning_content", "reasoning"):
        value = message.get(name)
        if isinstance(value, str) and value:
            return value
    return ""


def read_models(response) -> list[str]:
    """The model ids of a GET /models reply, sorted."""
    payload = response_json(response)
    models = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(models, list):
        raise ApiError("unexpected reply from the server: no list of models ('data')")
    return sorted(model["id"] for model in models
                  if isinstance(model, dict) and isinstance(model.get("id"), str))


class SSEDecoder:
    """A Server-Sent Events parser (WHATWG HTML, "Server-sent events"), fed bytes as they arrive.

    Lines end with CRLF, LF or CR; a blank line dispatches the event; a line
    starting with ":" is a comment; "field: value" loses one space after the
    colon; several data lines join with "\\n"; an event cut off by the end of
    the stream is dropped. Lines are split as bytes before decoding, so a
    character split across reads stays whole, and U+2028 inside the JSON is not
    taken for a line break.
    """

    def __init__(self, on_line=None):
        self.on_line = on_line  # called with each raw line, for the -v trace
        self.pending = b""
        self.started = False
        self.after_cr = False
        self.event = ""
        self.data = []

    def feed(self, chunk: bytes) -> list[tuple[str, str]]:
        """Take the next bytes of the stream; return the (event, data) pairs they complete."""
        if self.after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the LF of a CRLF that was split across two reads
        self.after_cr = chunk.endswith(b"\r")
        data = self.pending + chunk
        lines = data.splitlines()  # at LF, CRLF and CR only: str.splitlines() knows more breaks
        unfinished = lines and not data.endswith((b"\n", b"\r"))
        self.pending = lines.pop() if unfinished else b""
        if lines and not self.started:
            self.started = True
            lines[0] = lines[0].removeprefix(b"\xef\xbb\xbf")  # the spec strips one BOM
        events = []
        for line in lines:
            text = line.decode("utf-8", "replace")
            if self.on_line:
                self.on_line(text)
            if not text:  # a blank line dispatches the event
                if self.data:
                    events.append((self.event, "\n".join(self.data)))
                self.event, self.data = "", []
            elif not text.startswith(":"):  # a colon first makes a comment
                field, _, value = text.partition(":")
                value = value.removeprefix(" ")
                if field == "data":
                    self.data.append(value)
                elif field == "event":
                    self.event = value
                # "id" and "retry" only matter to a client that reconnects; this one does not.
        return events


def iter_body(response):
    """Yield the body's bytes as soon as they arrive, chunked or not.

    Reads urllib3's response directly (iter_content(chunk_size=None) would wait for
    the whole body when it is not chunked), so its errors are turned here into the
    ones requests raises, with the request attached for the error message.
    """
    import requests
    import urllib3

    raw = response.raw
    try:
        if raw.chunked:
            yield from raw.read_chunked(decode_content=True)  # each chunk as it comes
        elif hasattr(raw, "read1"):  # urllib3 2.3+
            while chunk := raw.read1(READ_SIZE, decode_content=True):
                yield chunk
        else:  # older urllib3: waits for READ_SIZE bytes or the end of the body
            yield from raw.stream(READ_SIZE, decode_content=True)
    except urllib3.exceptions.ReadTimeoutError as exc:
        raise requests.ReadTimeout(exc, request=response.request) from None
    except urllib3.exceptions.ProtocolError as exc:
        raise requests.exceptions.ChunkedEncodingError(exc, request=response.request) from None
    except urllib3.exceptions.SSLError as exc:
        raise requests.exceptions.SSLError(exc, request=response.request) from None
    except urllib3.exceptions.DecodeError as exc:
        raise requests.exceptions.ContentDecodingError(exc, request=response.request) from None


def stream_reply(response, output: Output, trace=None) -> Reply:
    """Show a streamed reply as it arrives, and return it whole."""
    reply = Reply(streamed=True)
    texts, thoughts = [], []
    try:
        decoder = SSEDecoder(trace.sse_line if trace else None)
        for chunk in iter_body(response):
            for event, data in decoder.feed(chunk):
                if data == "[DONE]":
                    reply.done = True
                    break
                text, reasoning = read_stream_event(event, data, reply)
                if reasoning:
                    output.reasoning(reasoning)
                    thoughts.append(reasoning)
                if text:
                    output.text(text)
                    texts.append(text)
            # One flush per network read, not per delta: the text that has arrived is
            # on screen before the next wait, with a fraction of the write calls.
            output.flush()
            if reply.done:
                break
    finally:
        response.close()
    reply.text, reply.reasoning = "".join(texts), "".join(thoughts)
    return reply


def read_stream_event(event: str, data: str, reply: Reply) -> tuple[str, str]:
    """The text and the reasoning one stream event adds; records finish_reason and usage."""
    if not data or data.isspace():
        return "", ""  # empty or blank data: a keep-alive some servers send
    try:
        chunk = json.loads(data)
    except ValueError:
        raise ApiError(f"malformed event in the stream: {data!r}") from None
    if not isinstance(chunk, dict):
        raise ApiError(f"unexpected event in the stream: {data!r}")
    if event == "error" or "error" in chunk:
        error = chunk.get("error", chunk)
        message = error.get("message") if isinstance(error, dict) else error
        raise ApiError(f"the server reported an error mid-stream: {message or data}")
    if chunk.get("usage"):
        reply.usage = chunk["usage"]
    try:
        choice = chunk["choices"][0]
        if choice.get("finish_reason"):
            reply.finish_reason = choice["finish_reason"]
        delta = choice["delta"]
        text = delta.get("content") or delta.get("refusal")
    except (KeyError, IndexError, TypeError, AttributeError):
        return "", ""  # no choices (a usage chunk, a keep-alive) or no delta: nothing to show
    return (text if isinstance(text, str) else ""), reasoning_text(delta)


def reply_warning(reply: Reply) -> str | None:
    """What to tell the user about a reply that may not be whole."""
    if reply.finish_reason == "length" and not reply.text.strip():
        count = token_detail(reply.usage, "completion_tokens_details", "reasoning_tokens")
        tokens = f" ({count} reasoning tokens)" if count is not None else ""
        return (f"the token limit went to reasoning{tokens} before any answer: "
                "raise --max-tokens or lower --reasoning-effort")
    if reply.finish_reason == "length":
        return "the reply was cut off at the token limit (finish_reason: length)"
    if reply.finish_reason == "content_filter":
        return "the reply was cut off by the content filter (finish_reason: content_filter)"
    if reply.streamed and not reply.done and not reply.finish_reason:
        return "the stream ended before the reply was complete"
    return None


def usage_line(usage) -> str:
    """-u: the token counts the server reported, as they were reported."""
    if not (isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int)
            and isinstance(usage.get("completion_tokens"), int)):
        return "usage: not reported by the server"
    counts = [f"{usage['prompt_tokens']} in", f"{usage['completion_tokens']} out"]
    for group, name, label in (("prompt_tokens_details", "cached_tokens", "cached"),
                               ("completion_tokens_details", "reasoning_tokens", "reasoning")):
        value = token_detail(usage, group, name)
        if value is not None:
            counts.append(f"{value} {label}")
    return "usage: " + ", ".join(counts)


def token_detail(usage, group: str, name: str) -> int | None:
    """A count inside usage's prompt_tokens_details or completion_tokens_details, if reported."""
    details = usage.get(group) if isinstance(usage, dict) else None
    value = details.get(name) if isinstance(details, dict) else None
    return value if isinstance(value, int) else None


class Output:
    """Shows a reply as it arrives: the text on stdout, the reasoning (when shown) on stderr,
    dimmed on a terminal, and until either starts, on a terminal, a line counting the wait."""

    def __init__(self, show_reasoning: bool, spin: bool):
        self.show_reasoning = show_reasoning
        self.color = sys.stderr.isatty() and not os.environ.get("NO_COLOR")
        self.spin = spin
        self.spinner = None  # a Spinner while waiting
        self.started = False  # text is on stdout: a failure can no longer be retried
        self.line_open = False  # the text so far does not end with a newline
        self.thinking = False  # reasoning is being shown on stderr
        self.thought_open = False  # ... and does not end with a newline

    def wait(self) -> None:
        if self.spin and not self.spinner:
            self.spinner = Spinner(self.color)

    def stop_waiting(self) -> None:
        if self.spinner:
            self.spinner.stop()
            self.spinner = None

    def reasoning(self, text: str) -> None:
        if not text or not self.show_reasoning:
            return
        self.stop_waiting()
        if not self.thinking and self.color:
            sys.stderr.write(DIM)
        self.thinking = True
        sys.stderr.write(text)
        self.thought_open = not text.endswith("\n")

    def text(self, text: str) -> None:
        if not text:
            return
        if self.thinking or self.spinner:
            self.end_reasoning()
        sys.stdout.write(text)
        self.started = True
        self.line_open = not text.endswith("\n")

    def show(self, reply: Reply) -> None:
        """A whole (not streamed) reply."""
        self.reasoning(reply.reasoning)
        self.text(reply.text)

    def flush(self) -> None:
        sys.stderr.flush()
        sys.stdout.flush()

    def end_reasoning(self) -> None:
        """Set the reasoning apart from what follows: its line ended, then a blank line."""
        self.stop_waiting()
        if self.thinking:
            sys.stderr.write((NORMAL if self.color else "") + "\n" * (1 + self.thought_open))
            sys.stderr.flush()
            self.thinking = False

    def end(self, complete: bool) -> None:
        """End the text's line, so that what follows starts on its own. A complete reply ends
        with exactly one newline (an empty reply is an empty line)."""
        self.end_reasoning()
        if self.line_open or (complete and not self.started):
            sys.stdout.write("\n")
            self.line_open = False
        sys.stdout.flush()

    def stop(self) -> None:
        """After Ctrl-C too: no spinner left running, no terminal left dimmed."""
        self.stop_waiting()
        if self.thinking and self.color:
            sys.stderr.write(NORMAL)
        self.thinking = False


class Spinner:
    """One stderr line counting the seconds waited, from its start until stop() erases it."""

    FRAMES = "|/-\\"

    def __init__(self, color: bool):
        import threading

        self.color = color
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.spin, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()

    def spin(self) -> None:
        started, frame, line = time.monotonic(), 0, ""
        while not self.stopping.wait(0.1):
            line = f"{self.FRAMES[frame % 4]} waiting {time.monotonic() - started:.0f} s"
            sys.stderr.write(f"\r{DIM}{line}{NORMAL}" if self.color else f"\r{line}")
            sys.stderr.flush()
            frame += 1
        if line:
            sys.stderr.write("\r" + " " * len(line) + "\r")
            sys.stderr.flush()


# ----------------------------------------------------------------- tracing


class Trace:
    """The -v trace of each HTTP exchange, on stderr, in the style of curl -v."""

    def __init__(self, key: str):
        self.key = key
        self.started = time.perf_counter()

    def write(self, prefix: str, text: str) -> None:
        for line in text.splitlines() or [""]:
            sys.stderr.write(redact(f"{prefix}{line}", self.key) + "\n")
        sys.stderr.flush()

    def exchange(self, response, with_body: bool) -> None:
        request = response.request
        url = urlsplit(request.url)
        path = url.path + (f"?{url.query}" if url.query else "")
        self.write("> ", f"{request.method} {path} HTTP/1.1\nHost: {url.netloc}")
        for name, value in request.headers.items():
            if name.lower() == "authorization":
                value = f"Bearer {mask_key(self.key)}"
            self.write("> ", f"{name}: {value}")
        self.write("> ", "")
        if request.body:
            self.write("> ", pretty_body(request.body))
        version = {10: "1.0", 11: "1.1", 20: "2"}.get(response.raw.version, "1.1")
        self.write("< ", f"HTTP/{version} {response.status_code} {status_reason(response)}")
        for name, value in response.headers.items():
            if name.lower() == "set-cookie":
                value = value.split("=", 1)[0] + "=…"
            self.write("< ", f"{name}: {value}")
        self.write("< ", "")
        if with_body and response.content:
            self.write("< ", pretty_body(response.content))
        self.write("* ", f"time to first byte: {response.elapsed.total_seconds():.3f} s")

    def sse_line(self, line: str) -> None:
        sys.stderr.write(redact(f"| {elide_base64(line)}", self.key) + "\n")

    def summary(self, usage: dict | None) -> None:
        self.write("* ", f"total time: {time.perf_counter() - self.started:.3f} s")
        if isinstance(usage, dict):
            counts = ", ".join(f"{name} {value}" for name, value in usage.items()
                               if isinstance(value, int))
            self.write("* ", f"tokens: {counts}")


def pretty_body(body: bytes | str) -> str:
    """A body for the trace: JSON indented, Base64 cut to its length, long strings cut."""
    try:
        return json.dumps(cut_strings(json.loads(body)), indent=2, ensure_ascii=False)
    except ValueError:
        text = elide_base64(body.decode("utf-8", "replace") if isinstance(body, bytes) else body)
        if len(text) > TRACE_TEXT_CHARS:
            text = text[:TRACE_TEXT_CHARS] + f"…({len(text):,} characters)"
        return text


def cut_strings(value):
    """A copy of a JSON value with Base64 elided and each long string cut to its start."""
    if isinstance(value, dict):
        return {key: cut_strings(item) for key, item in value.items()}
    if isinstance(value, list):
        return [cut_strings(item) for item in value]
    if isinstance(value, str):
        value = elide_base64(value)
        if len(value) > TRACE_STRING_CHARS:
            return value[:TRACE_STRING_CHARS] + f"…({len(value):,} characters)"
    return value


def curl_command(url: str, body: dict, send_key: bool, stream: bool) -> str:
    """A shell command that sends the same request with curl; the key stays in $OPENAI_API_KEY."""
    import shlex

    lines = [f"curl {'-N ' if stream else ''}{shlex.quote(url)}"]
    lines.append("-H 'Content-Type: application/json'")
    lines.append(f"-H {shlex.quote('User-Agent: ' + USER_AGENT)}")
    if send_key:
        lines.append('-H "Authorization: Bearer $OPENAI_API_KEY"')
    lines.append("--data-binary @- <<'JSON'")
    # A pretty-printed JSON document never has a line that is only JSON.
    return " \\\n  ".join(lines) + "\n" + json.dumps(body, indent=2, ensure_ascii=False) + "\nJSON"


# --------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chat.py",
        description="Ask an OpenAI-compatible chat-completions API. With no question "
        "on a terminal, start a conversation. Answered questions are saved: -c goes on.",
        epilog="Exit codes: 0 ok, 1 API error, 2 usage or input error, 3 network failure, "
        "4 timeout, 130 interrupted. The key is read from OPENAI_API_KEY (or .env); "
        "conversations are saved in $CHAT_PY_HOME, else ~/.local/state/chat-py.",
    )
    add = parser.add_argument
    add("question", nargs="*", help="the question; piped stdin is appended")
    add("-c", "--continue", dest="continue_", action="store_true",
        help="continue the conversation written last")
    add("--chat", metavar="NAME", help="continue conversation NAME, or start it")
    add("--chats", action="store_true", help="list the saved conversations, newest first")
    add("--show", nargs="?", const="", metavar="NAME",
        help="print a saved conversation (default: the newest)")
    add("--forget", metavar="NAME", help="delete a saved conversation")
    add("--no-save", action="store_true", help="do not save this run (or set CHAT_PY_NO_SAVE=1)")
    add("-f", "--file", action="append", default=[], metavar="PATH",
        help="add a text file to the question (repeatable)")
    add("--image", action="append", default=[], metavar="PATH_OR_URL",
        help="attach an image file or http(s)/data: URL (repeatable)")
    add("--detail", choices=["low", "high", "original", "auto"],
        help="image detail level, also how far local images are shrunk")
    add("--stream", action=argparse.BooleanOptionalAction, default=None,
        help="print the reply as it is generated (default: on in a conversation)")
    add("-m", "--model", metavar="NAME", help=f"model (env OPENAI_MODEL, else {DEFAULT_MODEL})")
    add("-s", "--system", metavar="TEXT", help="system prompt ('' for none)")
    add("--temperature", type=number, metavar="F", help="sampling temperature")
    add("--max-tokens", type=whole_number(1), metavar="N", help="most tokens in the reply")
    add("--reasoning-effort", metavar="LEVEL",
        help="sent as reasoning_effort (none, minimal, low, medium, high ...: servers differ)")
    add("--reasoning", choices=["show", "hide"],
        help="show the model's reasoning on stderr (default: when stderr is a terminal)")
    add("-o", "--option", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
        help="set any body field: VALUE as JSON, else text; null leaves it out (repeatable)")
    add("-u", "--usage", action="store_true", help="print the token usage on stderr")
    add("--models", action="store_true", help="list the server's models and exit")
    add("--base-url", metavar="URL", help=f"API root (env OPENAI_BASE_URL, else {DEFAULT_BASE_URL})")
    add("--timeout", type=seconds, default=DEFAULT_TIMEOUT, metavar="S",
        help="seconds to wait for each read (default: %(default)g); "
        f"connecting waits at most {CONNECT_TIMEOUT:g}")
    add("--retries", type=whole_number(0), default=DEFAULT_RETRIES, metavar="N",
        help="retries after 429, 5xx, timeouts and network errors (default: %(default)s)")
    add("-v", "--verbose", action="store_true",
        help="trace the HTTP exchange on stderr (the key masked)")
    add("--curl", action="store_true", help="print the equivalent curl command and send nothing")
    add("--version", action="version", version=f"%(prog)s {__version__}")
    parser.error = raise_usage_error
    return parser


def raise_usage_error(message: str):
    # "argument --max-tokens: must be ..." reads better as "--max-tokens must be ..."
    message = re.sub(r"^argument (\S+): must be", r"\1 must be", message)
    raise UsageError(f"{message} (see --help)")


def whole_number(minimum: int):
    def parse(text: str) -> int:
        if not re.fullmatch(r"\s*[+-]?\d+\s*", text) or int(text) < minimum:
            raise argparse.ArgumentTypeError(
                f"must be a whole number of at least {minimum}, not {text!r}")
        return int(text)

    return parse


def number(text: str) -> float:
    value = finite_float(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"must be a number, not {text!r}")
    return value


def seconds(text: str) -> float:
    value = finite_float(text)
    if value is None or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, not {text!r}")
    return value


def finite_float(text: str) -> float | None:
    """The number in text, or None; nan and inf are no numbers here (JSON cannot carry them)."""
    import math

    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def load_dotenv_file() -> None:
    """Load ./.env without overriding variables already set; a line python-dotenv cannot
    parse is a warning naming it."""
    if os.path.isfile(".env"):
        import logging

        from dotenv import load_dotenv  # about 15 ms to import; only paid when there is a .env

        def warn_instead(record: logging.LogRecord) -> bool:
            warn(".env: " + record.getMessage().removeprefix("python-dotenv ") + " (skipped)")
            return False

        logging.getLogger("dotenv.main").addFilter(warn_instead)
        load_dotenv(".env", override=False)


def read_piped_stdin(stdin) -> str | None:
    """All of stdin when it is not a terminal, as UTF-8 (undecodable bytes replaced)."""
    if stdin is None:  # started with stdin closed
        return ""
    if stdin.isatty():
        return None
    return decode_utf8(stdin.buffer.read(), "stdin")


def warn(message: str, key: str = "", tail: str = "") -> None:
    """One line: warning: MESSAGE, cut to fit, then the tail whole."""
    room = LINE_CHARS - len("warning: ") - len(tail)
    print(f"warning: {one_line(message, key, room)}{tail}", file=sys.stderr, flush=True)


def print_error(exc: ChatError, key: str, hint: str = "") -> None:
    """One line: error: MESSAGE HINT. The message is cut to fit; the hints stay whole."""
    hint = "".join(f" {part}" for part in (exc.hint, hint) if part)
    message = one_line(str(exc), key, LINE_CHARS - len("error: ") - len(hint))
    print(f"error: {message}{hint}", file=sys.stderr, flush=True)


def silence_stdout() -> None:
    """After a closed pipe, point stdout at /dev/null so the exit flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def main(argv: list[str] | None = None) -> int:
    """Run chat.py; return the exit status. Failures end here as one error line
    (a conversation reports a failed turn itself and goes on)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    key = ""
    try:
        args = build_parser().parse_args(argv)
        if hasattr(sys.stdout, "reconfigure"):
            sys.stdout.reconfigure(errors="replace")  # a reply the terminal cannot encode
        load_dotenv_file()
        key = os.environ.get("OPENAI_API_KEY", "").strip()
        return run(args, key)
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return ExitStatus.INTERRUPTED
    except BrokenPipeError:
        silence_stdout()
        return ExitStatus.OK
    except Exception as exc:
        if os.environ.get("CHAT_PY_TRACEBACK"):
            raise
        if not isinstance(exc, ChatError):
            exc = ChatError(f"unexpected {type(exc).__name__}: {exc}")
        print_error(exc, key)
        return exc.exit_status


def run(args: argparse.Namespace, key: str) -> int:
    """The program without its error handling."""
    folder = state_dir()
    if args.chats or args.show is not None or args.forget is not None:
        return manage_conversations(args, folder)
    base_url = args.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
    check_base_url(base_url)
    conn = Connection(base_url, key, args.timeout, args.retries)
    if args.models:
        check_key(conn)
        return print_models(conn, args.verbose)
    if args.model == "":
        raise UsageError("-m/--model needs a model name")
    options = parse_options(args.option)
    saving = not args.no_save and os.environ.get("CHAT_PY_NO_SAVE", "") in ("", "0")
    conversation = open_conversation(args, folder, saving)
    piped = read_piped_stdin(sys.stdin)
    files = [file_block(path, read_text_file(path)) for path in args.file]
    interactive = not args.question and piped is None and not args.curl
    question = build_question(args.question, piped, files)
    if not question and not interactive:
        raise UsageError('no question given: try  python chat.py "Why is the sky blue?"')
    if not args.curl:
        check_key(conn)
    settings = make_settings(args, base_url, options, conversation, interactive)
    image_urls = prepare_images(args.image, args.detail, args.verbose)
    if args.curl:
        user_message = build_user_message(question, image_urls, args.detail)
        body = build_body(settings, build_messages(conversation.turns, user_message, settings.system))
        send_key = bool(key) or is_openai_host(base_url)
        print(curl_command(api_url(base_url, "/chat/completions"), body, send_key, settings.stream))
        return ExitStatus.OK

    import requests

    with requests.Session() as session:
        if interactive:
            return converse(session, conn, settings, conversation, image_urls, files, args.detail)
        ask(session, conn, settings, conversation, build_user_message(question, image_urls, args.detail))
    return ExitStatus.OK


def manage_conversations(args: argparse.Namespace, folder: str) -> int:
    """--chats, --show and --forget: no network, no key."""
    if args.chats:
        list_conversations(folder)
    elif args.forget is not None:
        forget_conversation(conversation_path(folder, args.forget))
    else:
        show_conversation(conversation_path(folder, args.show or newest_conversation(folder)))
    return ExitStatus.OK


def check_key(conn: Connection) -> None:
    """Before sending: the key must fit in a header, OpenAI's hosts need one, and sending it
    unencrypted to another machine deserves a warning."""
    where = urlsplit(conn.base_url)
    if conn.key:
        check_api_key(conn.key)
        if where.scheme == "http" and not is_loopback(where.hostname):
            warn(f"sending the API key unencrypted to {where.netloc} over http://")
    elif is_openai_host(conn.base_url):
        raise UsageError("OPENAI_API_KEY is not set: export it, or put it in a .env file "
                         "(see .env.example); a local server needs no key: pass its --base-url")


def prepare_images(sources: list[str], detail: str | None, verbose: bool) -> list[str]:
    """The URL to send for each --image; with -v, a line per image saying what and why."""
    urls = []
    for source in sources:
        url, note = image_url(source, detail)
        if verbose:
            print(f"* {note}", file=sys.stderr)
        urls.append(url)
    return urls


def make_settings(args: argparse.Namespace, base_url: str, options: list, conversation: Conversation,
                  interactive: bool) -> Settings:
    """The run's settings; a continued conversation keeps its last model and system prompt
    unless -m or -s say otherwise."""
    last = conversation.turns[-1] if conversation.turns else {}
    return Settings(
        model=args.model or last.get("model") or os.environ.get("OPENAI_MODEL") or DEFAULT_MODEL,
        base_url=base_url,
        system=args.system if args.system is not None else last.get("system"),
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        reasoning_effort=args.reasoning_effort,
        options=options,
        stream=args.stream if args.stream is not None else interactive,
        usage=args.usage,
        show_reasoning=args.reasoning == "show" or (args.reasoning is None and sys.stderr.isatty()),
        verbose=args.verbose,
    )


def print_models(conn: Connection, verbose: bool) -> int:
    """--models: the ids the server lists at BASE_URL/models, sorted, one per line."""
    import requests

    trace = Trace(conn.key) if verbose else None
    with requests.Session() as session:
        models = request(session, conn, "/models", None, lambda response, _: read_models(response),
                         trace=trace)
    if not models:
        warn("the server lists no models")
    for model in models:
        print(model)
    return ExitStatus.OK


def ask(session, conn: Connection, settings: Settings, conversation: Conversation,
        user_message: dict, retry: bool = False) -> Reply:
    """Send the conversation so far and the new question, show the reply, save the turn.
    With retry, the question replaces the last turn's."""
    turns = conversation.turns[:-1] if retry else conversation.turns
    body = build_body(settings, build_messages(turns, user_message, settings.system))
    trace = Trace(conn.key) if settings.verbose else None
    # The trace shows progress itself; the spinner would tangle with it.
    output = Output(settings.show_reasoning, spin=sys.stderr.isatty() and not trace)

    def read(response, streamed: bool) -> Reply:
        return stream_reply(response, output, trace) if streamed else read_reply(response)

    try:
        reply = request(session, conn, "/chat/completions", body, read, output, trace)
        if not reply.streamed:
            output.show(reply)
        output.end(complete=True)
    except Exception:
        output.end(complete=False)  # the error starts on a line of its own
        raise
    finally:
        output.stop()
    if trace:
        trace.summary(reply.usage)
    warning = reply_warning(reply)
    if warning:
        warn(warning)
    if settings.usage:
        print(usage_line(reply.usage), file=sys.stderr, flush=True)
    conversation.add(make_turn(settings, body, user_message, reply), retry, conn.key)
    return reply


# ------------------------------------------------------------ conversation

COMMANDS = ("/help", "/exit", "/quit", "/reset", "/retry", "/model", "/system")
HELP = """\
/help          this list
/exit, /quit   leave (so do exit, quit and Ctrl-D)
/reset         start a new conversation (the old one stays saved)
/retry         ask the last question again
/model NAME    use another model from the next question on
/system TEXT   set the system prompt from the next question on
\"\"\"            on a line of its own: start a multi-line message; end it with another
//text         send "/text" as a message"""


def converse(session, conn: Connection, settings: Settings, conversation: Conversation,
             image_urls: list[str], files: list[str], detail: str | None) -> int:
    """The conversation mode: read a message, send the whole conversation, show the reply."""
    readline_ends_eof_line = enable_line_editing()
    print(banner(settings, conn, conversation), file=sys.stderr)
    last_question = conversation.turns[-1]["user"] if conversation.turns else None
    attached = False  # --image and -f go with the first question that gets an answer
    while True:
        try:
            line = read_message()
        except EOFError:
            if not readline_ends_eof_line:
                sys.stderr.write("\n")  # the shell's prompt starts on a line of its own
            return ExitStatus.OK
        command, argument = parse_command(line)
        if line.lower() in ("exit", "quit") or command in ("/exit", "/quit"):
            return ExitStatus.OK
        retry = False
        if command == "/reset":
            conversation = Conversation(conversation.folder, new_name(conversation.folder),
                                        save=conversation.save)
            last_question, attached = None, False
            print(f"(new conversation {conversation.name}; the last one stays saved)",
                  file=sys.stderr)
            continue
        if command == "/retry":
            if last_question is None:
                print("(nothing to retry yet)", file=sys.stderr)
                continue
            user_message = last_question
            retry = bool(conversation.turns) and conversation.turns[-1]["user"] is last_question
        elif command:
            print(run_command(command, argument, settings), file=sys.stderr)
            continue
        elif not line:
            continue
        else:
            text = line[1:] if line.startswith("//") else line
            user_message = build_user_message(build_question([text], None, [] if attached else files),
                                              [] if attached else image_urls, detail)
        last_question = user_message
        try:
            ask(session, conn, settings, conversation, user_message, retry)
            attached = True
        except KeyboardInterrupt:
            sys.stdout.write("\n")  # the partial reply stays on screen; the turn is not kept
        except ChatError as exc:
            print_error(exc, conn.key, "(/retry to ask again)")


def parse_command(line: str) -> tuple[str, str]:
    """The /command in a line and its argument, or ("", "") for a message: a known command,
    or any other single word starting with /. A line starting with // is a message."""
    word, *rest = line.split(maxsplit=1) or [""]
    if not word.startswith("/") or word.startswith("//") or (rest and word not in COMMANDS):
        return "", ""
    return word, rest[0].strip() if rest else ""


def run_command(command: str, argument: str, settings: Settings) -> str:
    """What /help, /model, /system and an unknown command answer."""
    if command == "/help":
        return HELP
    if command == "/model":
        settings.model = argument or settings.model
        return f"(model: {settings.model})"
    if command == "/system":
        settings.system = argument or settings.system
        return f"(system prompt: {settings.system or 'none'})"
    return f"(unknown command {command}, /help lists them; //{command[1:]} sends it as a message)"


def banner(settings: Settings, conn: Connection, conversation: Conversation) -> str:
    where = urlsplit(conn.base_url).netloc
    if settings.model == DEFAULT_MODEL and not is_openai_host(conn.base_url):
        where += " (a default model name: --models lists the server's)"
    turns = len(conversation.turns)
    which = (f"conversation {conversation.name}, {turns} turn{'' if turns == 1 else 's'}" if turns
             else f"new conversation {conversation.name}")
    return f"chat.py {__version__} · {settings.model} at {where} · {which} · /help, /exit or Ctrl-D"


def enable_line_editing() -> bool:
    """Line editing and history for input(), where Python has readline; with GNU readline also
    bracketed paste, so a pasted block is one message (CPython turns it off). Returns whether
    readline itself ends the line after Ctrl-D: from version 8.2 on, it does once bracketed paste
    is on (and input() only uses readline when stdout is a terminal too)."""
    try:
        import readline
    except ImportError:
        return False
    if "libedit" in (readline.__doc__ or ""):
        return False
    readline.parse_and_bind("set enable-bracketed-paste on")
    return getattr(readline, "_READLINE_RUNTIME_VERSION", 0) >= 0x0802 and sys.stdout.isatty()


def read_message() -> str:
    """One message: a line, a pasted block, or the lines between two lines of just \"\"\"."""
    line = input("> ").strip()
    if line != '"""':
        return line
    lines = []
    while (line := input("... ")).strip() != '"""':
        lines.append(line)
    return "\n".join(lines).strip("\n")


if __name__ == "__main__":
    sys.exit(main())

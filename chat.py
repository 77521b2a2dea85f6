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
    $ git diff | python chat.py "Review this"
    $ python chat.py --image cat.jpg "What is in this picture?"
    $ python chat.py --stream --base-url http://127.0.0.1:8080/v1 "Explain APIs"
    $ python chat.py                      # no question on a terminal: a conversation
    $ python chat.py --image missing.jpg "What is this?"
    error: cannot read image missing.jpg: No such file or directory

The reply goes to stdout; warnings and errors go to stderr. Exit codes:
0 reply printed, 1 API error, 2 usage or input error, 3 network failure,
4 timeout, 130 interrupted.
"""

import signal

if __name__ == "__main__":
    # Ctrl-C during the imports below would end in a traceback; until main() hands SIGINT
    # back to Python, it just ends the process (the shell reports 130).
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import argparse
import base64
import email.utils
import http.client
import io
import ipaddress
import json
import math
import os
import random
import re
import shlex
import socket
import sys
import time
import warnings
from enum import IntEnum
from urllib.parse import urlsplit

import requests
import urllib3

__version__ = "1.0.0"

DEFAULT_MODEL = "gpt-5.4-mini"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_TIMEOUT = 60.0  # seconds, for connecting and for each read
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

READ_SIZE = 64 * 1024  # most bytes taken from the socket per read while streaming
ERROR_SNIPPET_CHARS = 200
# Keys shorter than this are placeholders ("none", "x") that local servers
# accept; masking them would garble every message that contains the letters.
MIN_SECRET_CHARS = 8


class ExitStatus(IntEnum):
    """Exit codes of chat.py, as documented in the README."""

    OK = 0
    API_ERROR = 1
    USAGE = 2
    NETWORK = 3
    TIMEOUT = 4
    INTERRUPTED = 130


class ChatError(Exception):
    """A failure chat.py explains in one line; the class picks the exit code."""

    exit_status = ExitStatus.API_ERROR


class UsageError(ChatError):
    exit_status = ExitStatus.USAGE


class ApiError(ChatError):
    """The server answered, but not with a usable reply."""

    def __init__(self, message: str, retryable: bool = False, retry_after: float | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


# ---------------------------------------------------------------- builders


def build_question(words: list[str], piped: str | None) -> str:
    """Join the question words; piped text follows the question after a blank line."""
    question = " ".join(words).strip()
    # Keep the indentation of piped text's first line; drop blank lines around it.
    piped = (piped or "").rstrip().lstrip("\r\n")
    if question and piped:
        return f"{question}\n\n{piped}"
    return question or piped


def build_user_message(question: str, image_urls: list[str], detail: str | None) -> dict:
    """The user message: plain text, or a text part followed by one part per image."""
    if not image_urls:
        return {"role": "user", "content": question}
    parts = [{"type": "text", "text": question}]
    for url in image_urls:
        image = drop_nones({"url": url, "detail": detail})
        parts.append({"type": "image_url", "image_url": image})
    return {"role": "user", "content": parts}


def build_messages(history: list[dict], user_message: dict, system: str | None) -> list[dict]:
    """The messages of one request: the system prompt, earlier turns, the new question."""
    system_messages = [{"role": "system", "content": system}] if system else []
    return system_messages + history + [user_message]


def build_body(
    model: str,
    messages: list[dict],
    base_url: str,
    temperature: float | None = None,
    max_tokens: int | None = None,
    stream: bool = False,
) -> dict:
    """The chat-completions request body, holding only the options that were given."""
    return drop_nones(
        {
            "model": model,
            "messages": messages,
            "temperature": temperature,
            max_tokens_field(base_url): max_tokens,
            "stream": True if stream else None,
        }
    )


def drop_nones(mapping: dict) -> dict:
    return {key: value for key, value in mapping.items() if value is not None}


def is_openai_host(base_url: str) -> bool:
    host = urlsplit(base_url).hostname or ""
    return host == "api.openai.com" or host.endswith(".openai.azure.com")


def max_tokens_field(base_url: str) -> str:
    """OpenAI's hosts reject max_tokens for current models; other servers may only know it."""
    return "max_completion_tokens" if is_openai_host(base_url) else "max_tokens"


def completions_url(base_url: str) -> str:
    return base_url.rstrip("/") + "/chat/completions"


def is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_base_url(base_url: str) -> None:
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--base-url must be an http:// or https:// URL, not {base_url!r}")


def check_api_key(key: str) -> None:
    # requests would refuse such a header, quoting it (and so the key) in its error.
    if not key.isascii() or not key.isprintable() or " " in key:
        raise UsageError(
            "OPENAI_API_KEY holds spaces, control or non-ASCII characters; check its value"
        )


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


def image_url(source: str, detail: str | None) -> str:
    """The URL to send for --image: remote and data: URLs as given, local files inlined."""
    if source.startswith(("http://", "https://", "data:")):
        return source
    return encode_image_file(source, detail)


def encode_image_file(path: str, detail: str | None) -> str:
    """Read a local image, shrink it to what the model keeps at this detail, return a data: URL."""
    from PIL import Image, ImageOps  # Pillow is imported only when an image is attached

    try:
        with warnings.catch_warnings():
            # Pillow only warns between 89 and 179 megapixels; any of those is a bomb to us.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image = ImageOps.exif_transpose(shrink_image(image, detail))
                mime, data = encode_image(image)
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
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


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


# ------------------------------------------------------------- transport


def fetch_reply(
    session: requests.Session,
    url: str,
    body: dict,
    *,
    key: str,
    timeout: float,
    retries: int,
    out,
    trace=None,
) -> dict:
    """POST the body and read the reply, printing it to out as it arrives when it is streamed.
    Retry what a retry can fix, as long as nothing has been printed."""
    for attempt in range(retries + 1):
        reply = {"text": "", "finish_reason": None, "usage": None,
                 "streamed": False, "done": False, "printed": False}
        try:
            response = session.post(
                url,
                json=body,
                headers={"User-Agent": USER_AGENT},
                auth=bearer_auth(key) if key else None,
                timeout=timeout,
                stream=True,  # return at the headers; the body is read below
            )
            if trace:
                trace.exchange(response)
            if response.status_code >= 400:
                raise api_error(response)
            if is_event_stream(response, asked=body.get("stream", False)):
                stream_reply(response, out, reply, trace)
            else:
                reply.update(read_reply(response))
            return reply
        except (ApiError, requests.RequestException) as exc:
            wait = None if reply["printed"] else retry_wait(exc, attempt, retries)
            if wait is None:
                raise
            warn(redact(f"{explain_error(exc, timeout)[1]}; retrying in {wait:.1f} s "
                        f"(attempt {attempt + 2} of {retries + 1})", key))
            time.sleep(wait)
    raise AssertionError("unreachable: the last attempt returns or raises")


def is_event_stream(response: requests.Response, asked: bool) -> bool:
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


def is_transient(exc: requests.RequestException) -> bool:
    """Network failures worth another try: not TLS errors, not bad URLs or headers."""
    if isinstance(exc, requests.exceptions.SSLError) or speaks_no_http(exc):
        return False
    return isinstance(
        exc, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)
    )


def backoff_delay(attempt: int, rand=random.random) -> float:
    """0.5 s, 1 s, 2 s ... capped at 8 s, times a random factor in [0.75, 1]."""
    delay = min(INITIAL_RETRY_DELAY * 2**attempt, MAX_RETRY_DELAY)
    return delay * (1 - 0.25 * rand())


def parse_retry_after(headers, now: float | None = None) -> float | None:
    """Seconds the server asks us to wait: retry-after-ms, else Retry-After in seconds or as an
    HTTP date; None when it says nothing usable."""
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


def api_error(response: requests.Response) -> ApiError:
    """An ApiError for an HTTP error status, saying what the server said and whether to retry."""
    status = f"HTTP {response.status_code} {status_reason(response)}"
    error = error_payload(response)
    message = error.get("message") or error_snippet(response)
    text = f"{status}: {message}" if message and message.lower() not in status.lower() else status
    if "insufficient_quota" in (error.get("code"), error.get("type")):
        return ApiError(f"{text} (the account is out of quota: add credit, retrying will not help)")
    if response.status_code == 404:
        text += " (requests go to BASE_URL/chat/completions: check --base-url and --model)"
    should_retry = response.headers.get("x-should-retry", "").lower()
    if should_retry in ("true", "false"):
        retryable = should_retry == "true"
    else:
        retryable = response.status_code in RETRY_STATUSES or response.status_code >= 500
    wait = parse_retry_after(response.headers)
    if retryable and wait is not None and wait > MAX_RETRY_AFTER:
        return ApiError(f"{text} (the server asks to wait {wait:.0f} s: "
                        f"try again after {clock_after(wait)})")
    return ApiError(text, retryable=retryable, retry_after=wait)


def status_reason(response: requests.Response) -> str:
    if response.reason:
        return response.reason
    try:
        return http.HTTPStatus(response.status_code).phrase
    except ValueError:
        return ""


def error_payload(response: requests.Response) -> dict:
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


def error_snippet(response: requests.Response) -> str:
    """A short one-line excerpt of a non-JSON error body, without HTML markup."""
    text = response.content[: 64 * 1024].decode("utf-8", "replace")
    title = re.search(r"<title[^>]*>(.*?)</title>", text, re.I | re.S)
    if title:
        text = title.group(1)
    text = re.sub(r"<(script|style)\b.*?</\1>|<[^>]*>", " ", text, flags=re.I | re.S)
    text = " ".join(text.split())
    if len(text) > ERROR_SNIPPET_CHARS:
        text = text[:ERROR_SNIPPET_CHARS].rstrip() + "…"
    return text


# --------------------------------------------------------------- replies


def read_reply(response: requests.Response) -> dict:
    """The reply of a non-streamed completion: text, finish_reason and usage."""
    try:
        payload = response.json()
    except ValueError:
        raise ApiError(f"the server's reply is not JSON: {error_snippet(response)!r}") from None
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
    return {
        "text": text,
        "finish_reason": choices[0].get("finish_reason"),
        "usage": payload.get("usage"),
    }


def message_text(content) -> str | None:
    """Text from a message's content: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [part.get("text") for part in content if isinstance(part, dict)]
        return "".join(text for text in texts if isinstance(text, str))
    return None


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


def iter_body(response: requests.Response):
    """Yield the body's bytes as soon as they arrive, chunked or not.

    Reads urllib3's response directly (iter_content(chunk_size=None) would wait for
    the whole body when it is not chunked), so its errors are turned here into the
    ones requests raises, with the request attached for the error message.
    """
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


def stream_reply(response: requests.Response, out, reply: dict, trace=None) -> None:
    """Print a streamed reply's text as it arrives; fill in reply's text, finish_reason,
    usage, done (saw [DONE]) and printed (some text went out before a failure)."""
    reply["streamed"] = True
    parts = []
    try:
        decoder = SSEDecoder(trace.sse_line if trace else None)
        for chunk in iter_body(response):
            for event, data in decoder.feed(chunk):
                if data == "[DONE]":
                    reply["done"] = True
                    break
                text = read_stream_event(event, data, reply)
                if text:
                    out.write(text)
                    parts.append(text)
            # One flush per network read, not per delta: the text that has arrived is
            # on screen before the next wait, with a fraction of the write calls.
            out.flush()
            if reply["done"]:
                break
    except Exception:
        if parts:
            reply["printed"] = True
            out.write("\n")  # end the partial line so the error starts on its own
            out.flush()
        raise
    finally:
        response.close()
    reply["text"] = "".join(parts)


def read_stream_event(event: str, data: str, reply: dict) -> str:
    """The text one stream event adds; records finish_reason and usage in reply."""
    if not data:
        return ""  # "data:" alone: an empty event, sent by some servers as a keep-alive
    try:
        chunk = json.loads(data)
    except ValueError:
        raise ApiError(f"malformed event in the stream: {data[:ERROR_SNIPPET_CHARS]!r}") from None
    if not isinstance(chunk, dict):
        raise ApiError(f"unexpected event in the stream: {data[:ERROR_SNIPPET_CHARS]!r}")
    if event == "error" or "error" in chunk:
        error = chunk.get("error", chunk)
        message = error.get("message") if isinstance(error, dict) else error
        raise ApiError(f"the server reported an error mid-stream: {message or data}")
    if chunk.get("usage"):
        reply["usage"] = chunk["usage"]
    try:
        choice = chunk["choices"][0]
        if choice.get("finish_reason"):
            reply["finish_reason"] = choice["finish_reason"]
        delta = choice["delta"]
        text = delta.get("content") or delta.get("refusal")
    except (KeyError, IndexError, TypeError, AttributeError):
        return ""  # no choices (a usage chunk, a keep-alive) or no delta: nothing to print
    return text if isinstance(text, str) else ""


def reply_warning(reply: dict) -> str | None:
    """What to tell the user about a reply that may not be whole."""
    if reply["finish_reason"] == "length":
        return "the reply was cut off at the token limit (finish_reason: length)"
    if reply["finish_reason"] == "content_filter":
        return "the reply was cut off by the content filter (finish_reason: content_filter)"
    if reply["streamed"] and not reply["done"] and not reply["finish_reason"]:
        return "the stream ended before the reply was complete"
    return None


def warn(message: str) -> None:
    print(f"warning: {one_line(message)}", file=sys.stderr, flush=True)


def one_line(text: str) -> str:
    """Server text can hold line breaks and control characters; a message is one line."""
    return " ".join(text.split())


# ----------------------------------------------------------------- tracing


class Trace:
    """The -v trace of each HTTP exchange, on stderr, in the style of curl -v."""

    def __init__(self, key: str, stderr):
        self.key = key
        self.stderr = stderr
        self.started = time.perf_counter()

    def write(self, prefix: str, text: str) -> None:
        for line in text.splitlines() or [""]:
            self.stderr.write(redact(f"{prefix}{line}", self.key) + "\n")
        self.stderr.flush()

    def exchange(self, response: requests.Response) -> None:
        request = response.request
        url = urlsplit(request.url)
        path = url.path + (f"?{url.query}" if url.query else "")
        self.write("> ", f"{request.method} {path} HTTP/1.1\nHost: {url.netloc}")
        for name, value in request.headers.items():
            if name.lower() == "authorization":
                value = f"Bearer {mask_key(self.key)}"
            self.write("> ", f"{name}: {value}")
        self.write("> ", "")
        self.write("> ", pretty_body(request.body))
        version = {10: "1.0", 11: "1.1", 20: "2"}.get(response.raw.version, "1.1")
        self.write("< ", f"HTTP/{version} {response.status_code} {status_reason(response)}")
        for name, value in response.headers.items():
            if name.lower() == "set-cookie":
                value = value.split("=", 1)[0] + "=…"
            self.write("< ", f"{name}: {value}")
        self.write("< ", "")
        self.write("* ", f"time to first byte: {response.elapsed.total_seconds():.3f} s")

    def sse_line(self, line: str) -> None:
        self.stderr.write(redact(f"| {line}", self.key) + "\n")

    def summary(self, usage: dict | None) -> None:
        self.write("* ", f"total time: {time.perf_counter() - self.started:.3f} s")
        if isinstance(usage, dict):
            counts = ", ".join(f"{name} {value}" for name, value in usage.items()
                               if isinstance(value, int))
            self.write("* ", f"tokens: {counts}")


def pretty_body(body: bytes | str | None) -> str:
    """The JSON request body, indented, with each Base64 image cut to its length."""
    try:
        payload = json.loads(body or "null")
    except ValueError:
        return repr(body)
    return json.dumps(elide_data_urls(payload), indent=2, ensure_ascii=False)


def elide_data_urls(value):
    """A copy of value with data: URLs shortened to their header and length."""
    if isinstance(value, dict):
        return {key: elide_data_urls(item) for key, item in value.items()}
    if isinstance(value, list):
        return [elide_data_urls(item) for item in value]
    if isinstance(value, str) and value.startswith("data:") and ";base64," in value:
        header, data = value.split(",", 1)
        return f"{header},…({len(data):,} characters)"
    return value


def curl_command(url: str, body: dict, send_key: bool, stream: bool) -> str:
    """A shell command that sends the same request with curl; the key stays in $OPENAI_API_KEY."""
    lines = [f"curl {'-N ' if stream else ''}{shlex.quote(url)}"]
    lines.append("-H 'Content-Type: application/json'")
    lines.append(f"-H {shlex.quote('User-Agent: ' + USER_AGENT)}")
    if send_key:
        lines.append('-H "Authorization: Bearer $OPENAI_API_KEY"')
    lines.append("--data-binary @- <<'JSON'")
    # A pretty-printed JSON document never has a line that is only JSON.
    return " \\\n  ".join(lines) + "\n" + json.dumps(body, indent=2, ensure_ascii=False) + "\nJSON"


# -------------------------------------------------------------------- errors


def explain_error(exc: BaseException, timeout: float | None) -> tuple[ExitStatus, str]:
    """The exit status and one-line message for an exception raised while asking."""
    if isinstance(exc, ChatError):
        return exc.exit_status, str(exc)
    host = host_of(exc)
    if is_timeout(exc):
        limit = f" within {timeout:g} s (--timeout)" if timeout else ""
        if isinstance(exc, requests.ConnectTimeout):
            return ExitStatus.TIMEOUT, f"could not connect to {host}{limit}"
        return ExitStatus.TIMEOUT, f"{host} did not answer{limit}"
    if isinstance(exc, requests.exceptions.SSLError):
        return ExitStatus.NETWORK, f"TLS failure talking to {host}: {root_cause(exc)}"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return ExitStatus.NETWORK, f"the connection to {host} broke off mid-reply: {root_cause(exc)}"
    if isinstance(exc, requests.exceptions.ContentDecodingError):
        return ExitStatus.API_ERROR, f"cannot decode the reply from {host}: {root_cause(exc)}"
    if isinstance(exc, requests.TooManyRedirects):
        return ExitStatus.API_ERROR, f"too many redirects from {host}"
    if speaks_no_http(exc):
        return ExitStatus.API_ERROR, f"{host} did not answer in HTTP: {root_cause(exc)!r}"
    if isinstance(exc, requests.ConnectionError):
        if isinstance(innermost(exc), socket.gaierror):
            return ExitStatus.NETWORK, f"cannot resolve host {host}: {root_cause(exc)}"
        return ExitStatus.NETWORK, f"cannot reach {host}: {root_cause(exc)}"
    if isinstance(exc, requests.RequestException):
        return ExitStatus.NETWORK, f"request to {host} failed: {root_cause(exc)}"
    return ExitStatus.API_ERROR, f"unexpected {type(exc).__name__}: {exc}"


def is_timeout(exc: BaseException) -> bool:
    """True for timeouts, including a read timeout while iterating a body, which
    requests reports as a ConnectionError wrapping urllib3's ReadTimeoutError.
    (urllib3 2's NewConnectionError subclasses ConnectTimeoutError, so a refused
    connection is told apart by requests, not by checking urllib3's classes here.)"""
    if isinstance(exc, requests.Timeout):
        return True
    return isinstance(exc, requests.ConnectionError) and any(
        isinstance(arg, urllib3.exceptions.ReadTimeoutError) for arg in exc.args
    )


def speaks_no_http(exc: BaseException) -> bool:
    """True when the server sent something that is not HTTP (but did not just hang up)."""
    cause = innermost(exc)
    return isinstance(cause, http.client.HTTPException) and not isinstance(cause, ConnectionError)


def host_of(exc: BaseException) -> str:
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


# --------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chat.py",
        description="Ask an OpenAI-compatible chat-completions API. With no question "
        "on a terminal, start a conversation.",
        epilog="Exit codes: 0 ok, 1 API error, 2 usage or input error, 3 network failure, "
        "4 timeout, 130 interrupted. The key is read from OPENAI_API_KEY (or .env).",
    )
    parser.add_argument("question", nargs="*", help="the question; piped stdin is appended")
    parser.add_argument("--image", action="append", default=[], metavar="PATH_OR_URL",
                        help="attach an image file or http(s)/data: URL (repeatable)")
    parser.add_argument("--detail", choices=["low", "high", "original", "auto"],
                        help="image detail level, also how far local images are shrunk")
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                        help="print the reply as it is generated (default: on in a conversation)")
    parser.add_argument("-m", "--model", help=f"model (env OPENAI_MODEL, else {DEFAULT_MODEL})")
    parser.add_argument("-s", "--system", help="system prompt")
    parser.add_argument("--temperature", type=float, help="sampling temperature")
    parser.add_argument("--max-tokens", type=positive_int, metavar="N",
                        help="most tokens in the reply")
    parser.add_argument("--base-url", metavar="URL",
                        help=f"API root (env OPENAI_BASE_URL, else {DEFAULT_BASE_URL})")
    parser.add_argument("--timeout", type=positive_float, default=DEFAULT_TIMEOUT, metavar="S",
                        help="seconds to wait to connect and for each read (default: %(default)g)")
    parser.add_argument("--retries", type=non_negative_int, default=DEFAULT_RETRIES, metavar="N",
                        help="retries after 429, 5xx, timeouts and network errors "
                        "(default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="trace the HTTP exchange on stderr (the key masked)")
    parser.add_argument("--curl", action="store_true",
                        help="print the equivalent curl command and send nothing")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.error = raise_usage_error
    return parser


def raise_usage_error(message: str):
    raise UsageError(f"{message} (see --help)")


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(text)
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def load_dotenv_file() -> None:
    """Load ./.env without overriding variables already set."""
    if os.path.isfile(".env"):
        from dotenv import load_dotenv  # about 15 ms to import; only paid when there is a .env

        load_dotenv(".env", override=False)


def read_piped_stdin(stdin) -> str | None:
    """All of stdin when it is not a terminal, as UTF-8 (undecodable bytes replaced)."""
    if stdin is None:  # started with stdin closed
        return ""
    if stdin.isatty():
        return None
    data = stdin.buffer.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        warn(f"stdin is not UTF-8 (byte {data[exc.start]:#04x} at offset {exc.start}); "
             "undecodable bytes were replaced with U+FFFD")
        text = data.decode("utf-8", "replace")
    return text.removeprefix("\ufeff")


def print_error(message: str, key: str) -> None:
    print(f"error: {one_line(redact(message, key))}", file=sys.stderr)


def silence_stdout() -> None:
    """After a closed pipe, point stdout at /dev/null so the exit flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def main(argv: list[str] | None = None) -> int:
    """Run chat.py; return the exit status. Failures end here as one error line
    (a conversation reports a failed turn itself and goes on)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    key = ""
    timeout = None
    try:
        args = build_parser().parse_args(argv)
        timeout = args.timeout
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
        status, message = explain_error(exc, timeout)
        print_error(message, key)
        return status


def run(args: argparse.Namespace, key: str) -> int:
    """The program without its error handling."""
    base_url = args.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
    model = args.model or os.environ.get("OPENAI_MODEL") or DEFAULT_MODEL
    check_base_url(base_url)
    piped = read_piped_stdin(sys.stdin)
    question = build_question(args.question, piped)
    interactive = not question and piped is None and not args.curl
    if not question and not interactive:
        raise UsageError('no question given: try  python chat.py "Why is the sky blue?"')
    if key:
        check_api_key(key)
    elif is_openai_host(base_url) and not args.curl:
        raise UsageError("OPENAI_API_KEY is not set: export it, or put it in a .env file "
                         "(see .env.example)")
    url = completions_url(base_url)
    where = urlsplit(url)
    if key and where.scheme == "http" and not is_loopback(where.hostname):
        warn(f"sending the API key unencrypted to {where.netloc} over http://")
    image_urls = [image_url(source, args.detail) for source in args.image]
    stream = args.stream if args.stream is not None else interactive

    def make_body(messages: list[dict]) -> dict:
        return build_body(model, messages, base_url, args.temperature, args.max_tokens, stream)

    if args.curl:
        messages = build_messages([], build_user_message(question, image_urls, args.detail), args.system)
        send_key = bool(key) or is_openai_host(base_url)
        print(curl_command(url, make_body(messages), send_key, stream))
        return ExitStatus.OK

    with requests.Session() as session:

        def ask(messages: list[dict]) -> dict:
            trace = Trace(key, sys.stderr) if args.verbose else None
            reply = fetch_reply(session, url, make_body(messages), key=key, timeout=args.timeout,
                                retries=args.retries, out=sys.stdout, trace=trace)
            if not reply["streamed"]:
                sys.stdout.write(reply["text"])
            sys.stdout.write("\n")
            sys.stdout.flush()
            if trace:
                trace.summary(reply["usage"])
            warning = reply_warning(reply)
            if warning:
                warn(warning)
            return reply

        if interactive:
            return converse(ask, model, base_url, args.system, image_urls, args.detail,
                            args.timeout, key)
        user_message = build_user_message(question, image_urls, args.detail)
        ask(build_messages([], user_message, args.system))
    return ExitStatus.OK


# ------------------------------------------------------------ conversation

CHAT_COMMANDS = "/exit or Ctrl-D to leave, /reset to forget, /retry to ask again"


def converse(ask, model: str, base_url: str, system: str | None, image_urls: list[str],
             detail: str | None, timeout: float, key: str) -> int:
    """The interactive chat: read a line, send the whole history, print the reply, repeat."""
    try:
        import readline  # noqa: F401  (line editing and history for input(), where it exists)
    except ImportError:
        pass
    print(f"chat.py {__version__} · {model} at {urlsplit(base_url).netloc} · {CHAT_COMMANDS}",
          file=sys.stderr)
    history: list[dict] = []
    last_question = None
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            sys.stderr.write("\n")
            return ExitStatus.OK
        if line == "/exit":
            return ExitStatus.OK
        if line == "/reset":
            history, last_question = [], None
            print("(history cleared)", file=sys.stderr)
            continue
        if line == "/retry":
            if last_question is None:
                print("(nothing to retry yet)", file=sys.stderr)
                continue
            if history and history[-2] is last_question:
                del history[-2:]  # ask again instead of adding a second answer
            user_message = last_question
        elif not line:
            continue
        else:
            # --image goes with the first question that gets an answer (again after /reset)
            user_message = build_user_message(line, [] if history else image_urls, detail)
        last_question = user_message
        try:
            reply = ask(build_messages(history, user_message, system))
        except KeyboardInterrupt:
            sys.stdout.write("\n")  # the partial reply stays; the turn is not kept
            continue
        except (ChatError, requests.RequestException) as exc:
            print_error(f"{explain_error(exc, timeout)[1]} (/retry to ask again)", key)
            continue
        history += [user_message, {"role": "assistant", "content": reply["text"]}]


if __name__ == "__main__":
    sys.exit(main())

"""-f by content: text inline, a PDF as a file part, an image as --image sends it, WAV and MP3 as
input_audio; what is refused, the 16 MiB bound, -v, --show, --curl and -c with attachments, a
server refusing a part; the system-role fallback and the hint for OpenAI's tools with reasoning.

Every file is made at test time (a PDF written object by object, WAV with the wave module, MP3
frames from their header bits, images with Pillow, a zip with zipfile, an ELF header with
struct). chat.main() runs in this process against a local fake server.
"""

import base64
import io
import json
import math
import random
import re
import struct
import wave
import zipfile
from pathlib import Path

import pytest
from conftest import completion, json_response, saved
from PIL import Image

import chat

TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d")
SENDABLE = "images (PNG, JPEG, GIF, WebP, BMP, TIFF), PDF files, audio (WAV, MP3)"


def pdf_bytes(text: str = "Hello PDF") -> bytes:
    """A minimal valid PDF: one page showing text, with a correct cross-reference table. Its
    second line is the binary comment real PDFs carry, so it is not UTF-8 (yet holds no NUL)."""
    stream = f"BT /F1 24 Tf 20 40 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        (
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 100] /Contents 4 0 R "
            b"/Resources << /Font << /F1 5 0 R >> >> >>"
        ),
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


def wav_bytes(seconds: float = 0.1, rate: int = 8000) -> bytes:
    """A mono 16-bit WAV of a 440 Hz tone."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(rate)
        file.writeframes(
            b"".join(
                struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * n / rate)))
                for n in range(int(seconds * rate))
            )
        )
    return buffer.getvalue()


def mp3_bytes(frames: int = 3, id3: bool = False) -> bytes:
    """MPEG-1 Layer III frames of silence at 128 kbit/s, 44.1 kHz: each a 4-byte header (sync
    bits, version 1, layer III, no CRC; bitrate index 9, sample rate index 0) and 413 zero bytes
    (144 * 128000 / 44100 = 417 bytes a frame). id3: after an ID3v2.4 tag, as most files start."""
    frame = bytes([0xFF, 0xFB, 0x90, 0x64]) + bytes(413)
    tag = b""
    if id3:
        title = b"\x03tone"  # a TIT2 frame: UTF-8 encoding byte, then the text
        body = b"TIT2" + struct.pack(">I", len(title)) + b"\0\0" + title
        tag = b"ID3\x04\x00\x00" + bytes((len(body) >> shift) & 0x7F for shift in (21, 14, 7, 0))
        tag += body
    return tag + frame * frames


def zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes.txt", "hello\n")
    return buffer.getvalue()


def elf_bytes() -> bytes:
    """The 64-byte header of an x86-64 ELF executable (all a sniffer sees), then some code."""
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH", 2, 0x3E, 1, 0x401000, 64, 0, 0, 64, 56, 1, 64, 0, 0
    )
    return header + b"\x48\x31\xff\xb8\x3c\x00\x00\x00\x0f\x05"  # exit(0)


def png_bytes(size=(40, 30), color="red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def pdf_part(name: str, data: bytes) -> dict:
    return {
        "type": "file",
        "file": {"filename": name, "file_data": f"data:application/pdf;base64,{b64(data)}"},
    }


def audio_part(data: bytes, audio_format: str) -> dict:
    return {"type": "input_audio", "input_audio": {"data": b64(data), "format": audio_format}}


def write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def sent_content(server) -> list:
    [body] = server.bodies
    [message] = body["messages"]
    return message["content"]


class TestWhatTheServerReceives:
    def test_a_pdf_is_a_file_part_holding_its_exact_bytes(self, cli, server, tmp_path):
        data = pdf_bytes()
        write(tmp_path, "docs/paper.pdf", data)
        done = cli("--base-url", server.url, "-f", "docs/paper.pdf", "Summarize")
        assert (done.code, done.out, done.err) == (0, "Hello!\n", "")
        assert sent_content(server) == [
            {"type": "text", "text": "Summarize"},
            pdf_part("paper.pdf", data),  # the file's own name, without the folder
        ]

    @pytest.mark.parametrize(
        "name, data, audio_format",
        [
            ("tone.wav", wav_bytes(), "wav"),
            ("silence.mp3", mp3_bytes(), "mp3"),
            ("tagged.mp3", mp3_bytes(id3=True), "mp3"),
        ],
    )
    def test_audio_is_an_input_audio_part(self, cli, server, tmp_path, name, data, audio_format):
        write(tmp_path, name, data)
        done = cli("--base-url", server.url, "-f", name, "Transcribe")
        assert (done.code, done.out, done.err) == (0, "Hello!\n", "")
        assert sent_content(server) == [
            {"type": "text", "text": "Transcribe"},
            audio_part(data, audio_format),
        ]

    @pytest.mark.parametrize("detail", [None, "low"])
    def test_an_image_given_to_f_goes_as_image_sends_it(self, cli, server, tmp_path, detail):
        # A photo-like PNG over the low-detail size: resized by --image's rules (as a JPEG), sent
        # with the --detail asked for.
        noise = random.Random(0).randbytes(1000 * 800 * 3)
        Image.frombytes("RGB", (1000, 800), noise).save(tmp_path / "shot.png")
        options = ["--detail", detail] if detail else []
        for option in ("-f", "--image"):
            assert cli("--base-url", server.url, *options, option, "shot.png", "What?").code == 0
        by_f, by_image = (body["messages"][0]["content"] for body in server.bodies)
        assert by_f == by_image
        text, part = by_f
        assert text == {"type": "text", "text": "What?"}
        assert part["type"] == "image_url" and part["image_url"].get("detail") == detail
        header, data = part["image_url"]["url"].split(",")
        sent = Image.open(io.BytesIO(base64.b64decode(data)))
        assert (header, sent.size) == (
            "data:image/jpeg;base64",
            (512, 409) if detail == "low" else (1000, 800),
        )

    def test_a_text_file_still_goes_inline(self, cli, server, tmp_path):
        write(tmp_path, "notes.txt", b"line one\nline two\n")
        done = cli("--base-url", server.url, "-f", "notes.txt", "Check")
        assert (done.code, done.err) == (0, "")
        assert sent_content(server) == "Check\n\nnotes.txt\n```\nline one\nline two\n```"

    def test_the_content_decides_not_the_name(self, cli, server, tmp_path):
        pdf, wav = pdf_bytes(), wav_bytes()
        write(tmp_path, "notes.txt", pdf)  # a PDF named .txt
        write(tmp_path, "paper.pdf", b"%PDF is just a word here\n")  # text named .pdf
        write(tmp_path, "song.mp3", wav)  # a WAV named .mp3
        write(tmp_path, "photo.jpg", png_bytes())  # a PNG named .jpg
        done = cli(
            "--base-url",
            server.url,
            *("-f", "notes.txt", "-f", "paper.pdf", "-f", "song.mp3", "-f", "photo.jpg"),
            "Which is which?",
        )
        assert (done.code, done.err) == (0, "")
        text, file, audio, image = sent_content(server)
        assert text == {
            "type": "text",
            "text": "Which is which?\n\npaper.pdf\n```\n%PDF is just a word here\n```",
        }
        assert (file, audio) == (pdf_part("notes.txt", pdf), audio_part(wav, "wav"))
        assert image["image_url"]["url"].startswith("data:image/png;base64,")

    def test_text_then_each_part_in_the_order_given(self, cli, server, tmp_path):
        pdf, wav = pdf_bytes(), wav_bytes()
        write(tmp_path, "a.txt", b"alpha\n")
        write(tmp_path, "b.pdf", pdf)
        write(tmp_path, "c.png", png_bytes())
        write(tmp_path, "d.wav", wav)
        url = "https://example.com/e.jpg"
        done = cli(
            "--base-url",
            server.url,
            *("-f", "d.wav", "--image", url, "-f", "b.pdf", "-f", "a.txt", "-f", "c.png"),
            "All of it",
        )
        assert (done.code, done.err) == (0, "")
        text, audio, remote, file, local = sent_content(server)
        assert text == {"type": "text", "text": "All of it\n\na.txt\n```\nalpha\n```"}
        assert (audio, remote, file) == (
            audio_part(wav, "wav"),
            {"type": "image_url", "image_url": {"url": url}},
            pdf_part("b.pdf", pdf),
        )
        assert local["image_url"]["url"] == f"data:image/png;base64,{b64(png_bytes())}"


@pytest.mark.parametrize(
    "start, judged",
    [
        (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "image"),
        (b"\xff\xd8\xff\xe0\0\x10JFIF\0", "image"),
        (b"GIF87a\x01\0\x01\0", "image"),
        (b"RIFF\x1a\0\0\0WEBPVP8 ", "image"),
        (b"BM\x3a\0\0\0\0\0\0\0\x36\0", "image"),
        (b"II*\0\x08\0\0\0\0\0\0\0\0\0", "image"),
        (b"MM\0*\0\0\0\x08\0\0\0\0\0\0", "image"),
        (b"%PDF-1.7\n%\xe2\xe3", "file"),
        (b"RIFF\x24\0\0\0WAVEfmt ", "wav"),
        (b"ID3\x03\0\0\0\0\0\x0a", "mp3"),
        (b"\xff\xfb\x90\x64\0\0", "mp3"),  # MPEG-1 layer III, 128 kbit/s, 44.1 kHz
        (b"\xff\xf3\x48\xc4\0\0", "mp3"),  # MPEG-2, 32 kbit/s, 16 kHz
        (b"\xff\xe3\x18\xc4\0\0", "mp3"),  # MPEG-2.5, 8 kbit/s, 8 kHz
        (b"\xff\xfb\xf0\x64\0\0", None),  # bitrate index 15: no frame
        (b"\xff\xfb\x9c\x64\0\0", None),  # sample rate index 3: no frame
        (b"\xff\xfd\x90\x64\0\0", None),  # layer II
        (b"RIFF\x24\0\0\0AVI LIST", None),
        (b"\xff\xfeh\0i\0", None),  # UTF-16 text: NUL bytes
    ],
)
def test_each_kind_is_known_by_its_first_bytes(tmp_path, start, judged):
    """The first kind whose first bytes match: an image goes on to Pillow (which cannot decode a
    header alone), a PDF or audio becomes its part, anything else is refused."""
    write(tmp_path, "x", start)
    env = chat.Env(cwd=str(tmp_path))
    if judged in ("file", "wav", "mp3"):
        part, _ = chat.read_attachment("x", None, env)
        assert part == (pdf_part("x", start) if judged == "file" else audio_part(start, judged))
        return
    with pytest.raises(chat.UsageError) as refused:
        chat.read_attachment("x", None, env)
    if judged == "image":  # Pillow's refusal: the header alone is no image it can open or decode
        assert str(refused.value).startswith(
            ("cannot decode image x: ", "x is not an image chat.py can send (")
        )
    else:
        assert str(refused.value).startswith("cannot add x: it is not text")


class TestRefused:
    @pytest.mark.parametrize(
        "name, data",
        [("archive.zip", zip_bytes()), ("program", elf_bytes()), ("notes.txt", b"a\0b")],
    )
    def test_a_file_of_no_kind_chat_py_sends_is_exit_2(self, cli, server, tmp_path, name, data):
        write(tmp_path, name, data)
        done = cli("--base-url", server.url, "-f", name, "What is this?")
        assert (done.code, done.out) == (2, "")
        assert done.err == (
            f"error: cannot add {name}: it is not text (it holds NUL bytes) and not one of the "
            f"files chat.py can send: {SENDABLE}\n"
        )
        assert server.requests == []

    def test_each_file_is_read_up_to_16_mib(self, cli, server, tmp_path):
        limit = chat.MAX_INPUT
        assert limit == 16 * 2**20
        path = write(tmp_path, "big.pdf", b"%PDF-1.4\n")
        with open(path, "r+b") as file:
            file.truncate(limit + 1)
        done = cli("--base-url", server.url, "-f", "big.pdf", "Summarize")
        assert (done.code, done.out, done.err) == (
            2,
            "",
            "error: big.pdf holds more than 16 MiB: chat.py reads no further (send a part of it)\n",
        )
        assert server.requests == []
        with open(path, "r+b") as file:
            file.truncate(limit)
        done = cli("--base-url", server.url, "-f", "big.pdf", "Summarize")
        assert (done.code, done.err) == (0, "")
        part = sent_content(server)[1]["file"]
        assert base64.b64decode(part["file_data"].split(",")[1]) == path.read_bytes()


class TestShownToTheUser:
    def test_verbose_notes_each_attachment_and_never_prints_base64(self, cli, server, tmp_path):
        pdf, wav, mp3 = pdf_bytes(), wav_bytes(0.001), mp3_bytes(1)
        assert len(b64(wav)) < 100  # too short to look like Base64: elided as input_audio's data
        for name, data in [("p.pdf", pdf), ("w.wav", wav), ("m.mp3", mp3), ("t.txt", b"hi\n")]:
            write(tmp_path, name, data)
        done = cli(
            "--base-url",
            server.url,
            "-v",
            *("-f", "p.pdf", "-f", "w.wav", "-f", "m.mp3", "-f", "t.txt"),
            "q",
        )
        assert (done.code, done.out) == (0, "Hello!\n"), done.err
        assert done.err.partition("> POST ")[
            0
        ].splitlines() == [  # one note each, before the request
            f"* file p.pdf: {len(pdf):,} bytes; sent as it is (file part)",
            f"* audio w.wav: {len(wav):,} bytes; sent as it is (input_audio part)",
            f"* audio m.mp3: {len(mp3):,} bytes; sent as it is (input_audio part)",
            "* text t.txt: 3 bytes; inline in the question",
        ]
        assert f'"file_data": "data:application/pdf;base64,…({len(b64(pdf)):,} characters)"' in (
            done.err
        )
        assert f'"data": "…({len(b64(wav)):,} characters of Base64)"' in done.err
        assert f'"data": "…({len(b64(mp3)):,} characters of Base64)"' in done.err
        for data in (pdf, wav, mp3):
            assert b64(data)[:40] not in done.err

    def test_show_labels_each_attachment_with_the_name_given(self, cli, server, tmp_path):
        write(tmp_path, "docs/paper.pdf", pdf_bytes())
        write(tmp_path, "talk.wav", wav_bytes())
        write(tmp_path, "cat.png", png_bytes())
        write(tmp_path, "notes.txt", b"inline\n")
        done = cli(
            "--base-url",
            server.url,
            *("--chat", "mixed", "-f", "docs/paper.pdf", "-f", "talk.wav"),
            *("-f", "cat.png", "-f", "notes.txt", "What?"),
        )
        assert done.code == 0, done.err
        assert saved()["mixed"][0]["attachments"] == ["docs/paper.pdf", "talk.wav", "cat.png"]
        done = cli("--show", "mixed")
        assert (done.code, done.err) == (0, "")
        assert TIME.sub("TIME", done.out) == (
            "conversation mixed: 1 turn\n"
            "\nyou, TIME:\n  What?\n\n  notes.txt\n  ```\n  inline\n  ```\n"
            "  [file: docs/paper.pdf]\n  [audio: talk.wav]\n  [image: cat.png]\n"
            "\nassistant (test-model):\n  Hello!\n"
        )

    def test_curl_holds_each_part_whole(self, cli, server, tmp_path):
        pdf, wav = pdf_bytes(), wav_bytes()
        write(tmp_path, "p.pdf", pdf)
        write(tmp_path, "w.wav", wav)
        done = cli("--base-url", server.url, "--curl", "-f", "p.pdf", "-f", "w.wav", "Both?")
        assert (done.code, done.err) == (0, "")
        head, _, document = done.out.partition("--data-binary @- <<'JSON'\n")
        assert head.startswith(f"curl {server.url}/chat/completions")
        assert document.endswith("\nJSON\n")
        assert json.loads(document.removesuffix("JSON\n"))["messages"][0]["content"] == [
            {"type": "text", "text": "Both?"},
            pdf_part("p.pdf", pdf),
            audio_part(wav, "wav"),
        ]
        assert server.requests == []

    def test_c_sends_the_attachments_again(self, cli, server, tmp_path):
        pdf, wav = pdf_bytes(), wav_bytes()
        write(tmp_path, "p.pdf", pdf)
        write(tmp_path, "w.wav", wav)
        server.reply(json_response(completion("first")), json_response(completion("second")))
        assert cli("--base-url", server.url, "-f", "p.pdf", "-f", "w.wav", "Both?").code == 0
        (tmp_path / "p.pdf").unlink()  # what goes again is what was sent, not the file now
        done = cli("--base-url", server.url, "-c", "And the second?")
        assert (done.code, done.out, done.err) == (0, "second\n", "")
        first, again = server.bodies
        question = {
            "role": "user",
            "content": [
                {"type": "text", "text": "Both?"},
                pdf_part("p.pdf", pdf),
                audio_part(wav, "wav"),
            ],
        }
        assert first["messages"] == [question]
        assert again["messages"] == [
            question,
            {"role": "assistant", "content": "first"},
            {"role": "user", "content": "And the second?"},
        ]


class TestARefusedPart:
    @pytest.mark.parametrize(
        "files, status, body, line",
        [
            # llama-server's own answers (tests/test_realmodel.py meets them for real)
            (
                ["p.pdf"],
                400,
                {
                    "error": {
                        "code": 400,
                        "message": "unsupported content[].type",
                        "type": "invalid_request_error",
                    }
                },
                (
                    "HTTP 400 Bad Request: unsupported content[].type "
                    "(this server may not take PDF files)"
                ),
            ),
            (
                ["p.pdf", "w.wav"],
                400,
                {
                    "error": {
                        "code": 400,
                        "message": "unsupported content[].type",
                        "type": "invalid_request_error",
                    }
                },
                (
                    "HTTP 400 Bad Request: unsupported content[].type "
                    "(this server may not take PDF files or audio)"
                ),
            ),
            (
                ["p.pdf", "w.wav"],
                500,
                {
                    "error": {
                        "code": 500,
                        "message": "audio input is not supported - hint: if this is unexpected, "
                        "you may need to provide the mmproj",
                        "type": "server_error",
                    }
                },
                (
                    "HTTP 500 Internal Server Error: audio input is not supported - hint: if "
                    "this is unexpected, you may need to provide the mmproj (this server may "
                    "not take audio)"
                ),
            ),
        ],
    )
    def test_the_hint_names_the_part(self, cli, server, tmp_path, files, status, body, line):
        write(tmp_path, "p.pdf", pdf_bytes())
        write(tmp_path, "w.wav", wav_bytes())
        server.reply(json_response(body, status))
        done = cli(
            "--base-url",
            server.url,
            "--retries",
            "0",
            *[arg for name in files for arg in ("-f", name)],
            "q",
        )
        assert (done.code, done.out, done.err) == (1, "", f"error: {line}\n")

    def test_no_hint_for_an_error_about_something_else(self, cli, server, tmp_path):
        write(tmp_path, "p.pdf", pdf_bytes())
        server.reply(json_response({"error": {"message": "Invalid model: x"}}, 400))
        done = cli("--base-url", server.url, "-f", "p.pdf", "q")
        assert (done.code, done.err) == (1, "error: HTTP 400 Bad Request: Invalid model: x\n")


# Chat templates that refuse the system role, word for word as llama.cpp's tests keep them
# (ggml-org/llama.cpp tests/test-chat-template.cpp at commit
# 03f94f19a2c4c9d039fa1a84838fe3e2110cc28d):
#   google/gemma-7b-it: "{% if messages[0]['role'] == 'system' %}
#                        {{ raise_exception('System role not supported') }}{% endif %}..."
#   mistralai/Mistral-7B-Instruct-v0.2: "...{% else %}
#                        {{ raise_exception('Only user and assistant roles are supported!') }}"
# vLLM answers a template's exception with HTTP 400 and this body, recorded in
# vllm-project/vllm#2964 for gemma-2b-it: {"object":"error","message":"System role not
# supported","type":"BadRequestError","param":null,"code":400}. llama-cpp-python and TGI send the
# same words in a 500 (llama-cpp-python#1580, sgl-project/sglang#892).
TEMPLATE_REFUSALS = ["System role not supported", "Only user and assistant roles are supported!"]
FELL_BACK = (
    "* the server refuses the system role; sending the system prompt at the start of the "
    "first user message"
)


def refusal(message: str, status: int = 400) -> bytes:
    return json_response(
        {
            "object": "error",
            "message": message,
            "type": "BadRequestError",
            "param": None,
            "code": status,
        },
        status,
        reason={400: "Bad Request", 500: "Internal Server Error"}[status],
    )


class TestSystemRoleFallback:
    @pytest.mark.parametrize("message", TEMPLATE_REFUSALS)
    @pytest.mark.parametrize("status", [400, 500])
    def test_the_system_prompt_goes_in_the_first_user_message(self, cli, server, message, status):
        server.reply(refusal(message, status), json_response(completion("Hi.")))
        done = cli("--base-url", server.url, "-v", "-s", "Be brief.", "Hello")
        assert (done.code, done.out) == (0, "Hi.\n"), done.err
        assert len(server.requests) == 2  # before any retry, even of a 500
        assert FELL_BACK + "\n" in done.err and "retrying" not in done.err
        first, second = server.bodies
        assert first["messages"] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello"},
        ]
        assert second == {**first, "messages": [{"role": "user", "content": "Be brief.\n\nHello"}]}
        [[turn]] = saved().values()
        assert (turn["system"], turn["user"]) == ("Be brief.", {"role": "user", "content": "Hello"})

    def test_with_parts_the_system_prompt_is_the_first_text_part(self, cli, server, tmp_path):
        pdf = pdf_bytes()
        write(tmp_path, "p.pdf", pdf)
        server.reply(refusal(TEMPLATE_REFUSALS[0]), json_response(completion("ok")))
        done = cli("--base-url", server.url, "-s", "Be brief.", "-f", "p.pdf", "Summarize")
        assert (done.code, done.out, done.err) == (0, "ok\n", "")
        assert server.bodies[1]["messages"] == [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Be brief."},
                    {"type": "text", "text": "Summarize"},
                    pdf_part("p.pdf", pdf),
                ],
            }
        ]

    def test_in_a_conversation_it_goes_in_the_first_question(self, cli, server):
        server.reply(json_response(completion("one")))
        assert cli("--base-url", server.url, "First").code == 0
        server.reply(refusal(TEMPLATE_REFUSALS[1]), json_response(completion("two")))
        done = cli("--base-url", server.url, "-c", "-s", "Be brief.", "Second")
        assert (done.code, done.out, done.err) == (0, "two\n", "")
        assert server.bodies[2]["messages"] == [
            {"role": "user", "content": "Be brief.\n\nFirst"},
            {"role": "assistant", "content": "one"},
            {"role": "user", "content": "Second"},
        ]

    @pytest.mark.parametrize("status", [400, 500])
    def test_refused_twice_is_the_first_refusal_after_exactly_two_requests(
        self, cli, server, status
    ):
        server.reply(refusal("System role not supported", status))
        done = cli("--base-url", server.url, "-v", "-s", "Be brief.", "Hello")
        assert (done.code, done.out) == (1, "")
        reason = {400: "Bad Request", 500: "Internal Server Error"}[status]
        assert done.err.endswith(f"\nerror: HTTP {status} {reason}: System role not supported\n")
        assert (done.err.count("> POST "), done.err.count(FELL_BACK + "\n")) == (2, 1)
        assert len(server.requests) == 2 and "retrying" not in done.err

    def test_without_a_system_prompt_there_is_nothing_to_move(self, cli, server):
        server.reply(refusal("System role not supported"))
        done = cli("--base-url", server.url, "Hello")
        assert (done.code, done.err) == (
            1,
            "error: HTTP 400 Bad Request: System role not supported\n",
        )
        assert len(server.requests) == 1


REPLAYS = Path(__file__).parent / "replays"


@pytest.mark.parametrize(
    "message",
    [
        None,  # the replay's: gpt-5.6's wording
        # the earlier wording, for gpt-5.4, quoted in pipecat-ai/pipecat#4043's error log
        (
            "Function tools with reasoning_effort are not supported for gpt-5.4 in "
            "/v1/chat/completions. Please use /v1/responses instead."
        ),
    ],
)
def test_tools_with_reasoning_get_the_way_out(cli, server, message):
    """OpenAI's 400 for function tools on /chat/completions with a reasoning model (replayed from
    tests/replays/, which names its source): its message, then the option that helps."""
    replay = json.loads((REPLAYS / "openai-error-400-tools-with-reasoning.json").read_text())
    body = json.loads(replay["body"])
    body["error"]["message"] = message or body["error"]["message"]
    server.reply(json_response(json.dumps(body, indent=2).encode(), replay["status"]))
    done = cli("--base-url", server.url, *replay["args"], "q")
    assert (done.code, done.out, done.err) == (
        1,
        "",
        (
            f"error: HTTP 400 Bad Request: {body['error']['message']} (for -o tools on "
            "/chat/completions add --reasoning-effort none, or use the Responses API)\n"
        ),
    )
    assert len(server.requests) == 1

"""Image preparation: sizes per detail level, orientation, formats and modes, when a file's own
bytes go, broken files, and images on the wire.

Every image is generated with Pillow at test time; small ones where the size does not matter.
chat.read_attachment(..., image=True) is called directly, with an Env whose folder holds the
image.
"""

import base64
import io
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import zlib
from types import SimpleNamespace

import pytest
from conftest import CHAT, FAKE_KEY, completion, json_response
from PIL import Image, ImageDraw

import chat


def image_url(source: str, detail: str | None, folder) -> tuple[str, str]:
    """The URL of the image part that --image SOURCE adds, and its -v note."""
    part, note = chat.read_attachment(source, detail, chat.Env(cwd=str(folder)), image=True)
    assert part["type"] == "image_url"
    return part["image_url"]["url"], note


def prepared(path, detail=None) -> tuple[str, bytes, str]:
    """(MIME type, bytes, -v note) of what chat.py sends for a local image."""
    url, note = image_url(path.name, detail, path.parent)
    header, data = url.split(",", 1)
    assert header.startswith("data:image/") and header.endswith(";base64")
    return (
        header.removeprefix("data:").removesuffix(";base64"),
        base64.b64decode(data, validate=True),
        note,
    )


def sent_image(path, detail=None) -> tuple[str, Image.Image]:
    mime, data, _ = prepared(path, detail)
    image = Image.open(io.BytesIO(data))
    image.load()
    return mime, image


def save(image: Image.Image, path, **params):
    image.save(path, **params)
    return path


def noise(size, seed=0) -> Image.Image:
    """A photo-like RGB image: every pixel different, so shrinking it always saves bytes."""
    return Image.frombytes("RGB", size, random.Random(seed).randbytes(size[0] * size[1] * 3))


def screenshot(size=(1620, 1222)) -> Image.Image:
    """A screenshot-like RGBA image: lines of text on flat white, one transparent corner."""
    image = Image.new("RGBA", size, "white")
    draw = ImageDraw.Draw(image)
    for y in range(0, size[1], 18):
        draw.text(
            (10, y), "def function(argument): return argument * 2  # a comment " * 3, fill="black"
        )
    draw.rectangle((0, 0, 40, 40), fill=(0, 0, 0, 0))
    return image


def orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


def drop_nones(mapping: dict) -> dict:
    return {key: value for key, value in mapping.items() if value is not None}


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a size in its IHDR chunk but holds almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A 3000x2000 photo-like JPEG, past both high-detail limits: made once for the module."""
    return save(noise((3000, 2000)), tmp_path_factory.mktemp("photo") / "photo.jpg", quality=90)


class TestFitSize:
    @pytest.mark.parametrize(
        "size, detail, expected",
        [
            ((6000, 4000), None, (1536, 1024)),
            ((6000, 4000), "auto", (1536, 1024)),
            ((6000, 4000), "high", (1536, 1024)),
            ((6000, 4000), "low", (512, 341)),
            ((6000, 4000), "original", (6000, 4000)),
            ((4000, 1000), None, (2048, 512)),
            ((1000, 4000), "low", (128, 512)),
            ((1024, 768), None, (1024, 768)),
            ((300, 200), "low", (300, 200)),
            ((1, 1), None, (1, 1)),
            ((100000, 10), None, (2048, 1)),
        ],
    )
    def test_table(self, size, detail, expected):
        assert chat.fit_size(size, detail) == expected

    @pytest.mark.parametrize("width", [1999, 2500, 3001, 4097, 7777, 12345])
    @pytest.mark.parametrize("height", [1001, 1999, 3456, 8191])
    def test_high_detail_budget_is_never_exceeded(self, width, height):
        new_width, new_height = chat.fit_size((width, height), None)
        assert new_width * new_height <= chat.HIGH_DETAIL_PIXELS
        assert max(new_width, new_height) <= chat.HIGH_DETAIL_LONG_SIDE
        # same aspect ratio: the short side is within a pixel of the long side's scale
        if width >= height:
            assert abs(new_height - height * new_width / width) < 1
        else:
            assert abs(new_width - width * new_height / height) < 1
        # and nothing the model keeps is lost: one more pixel per side would break a limit
        bigger = (new_width + 1) * (new_height + 1)
        assert bigger > chat.HIGH_DETAIL_PIXELS or max(new_width, new_height) + 1 > 2048


class TestLocalImages:
    @pytest.mark.parametrize(
        "detail, size",
        [
            (None, (1536, 1024)),
            ("high", (1536, 1024)),
            ("low", (512, 341)),
            ("original", (3000, 2000)),
        ],
    )
    def test_a_photo_is_shrunk_to_what_the_detail_keeps(self, photo, detail, size):
        mime, data, note = prepared(photo, detail)
        image = Image.open(io.BytesIO(data))
        assert (mime, image.size) == ("image/jpeg", size)
        assert len(data) < os.path.getsize(photo)
        assert note == (
            f"image photo.jpg: 3000x2000 JPEG RGB, {os.path.getsize(photo):,} bytes; "
            f"sent {size[0]}x{size[1]} JPEG, {len(data):,} bytes (smaller than the file)"
        )

    def test_small_images_are_never_upscaled(self, tmp_path):
        path = save(Image.new("RGB", (40, 30), "red"), tmp_path / "small.bmp")
        assert sent_image(path, "low")[1].size == (40, 30)

    def test_a_relative_path_is_found_in_the_runs_folder(self, tmp_path):
        (tmp_path / "sub").mkdir()
        save(Image.new("L", (3, 2), 9), tmp_path / "sub" / "dot.png")
        url, note = image_url("dot.png", None, tmp_path / "sub")
        assert url.startswith("data:image/png;base64,") and note.startswith(
            "image dot.png: 3x2 PNG L, "
        )

    @pytest.mark.parametrize("detail, size", [(None, (400, 800)), ("low", (256, 512))])
    def test_exif_orientation_is_applied(self, tmp_path, detail, size):
        # Stored 800x400, left half red, right half blue; orientation 6 means
        # "rotate 90 degrees clockwise to display": shown 400x800, red on top.
        stored = Image.new("RGB", (800, 400), "blue")
        stored.paste("red", (0, 0, 400, 400))
        _, image = sent_image(save(stored, tmp_path / "turned.jpg", exif=orientation(6)), detail)
        width, height = image.size
        assert (width, height) == size
        top = image.getpixel((width // 2, height // 4))
        bottom = image.getpixel((width // 2, 3 * height // 4))
        assert top[0] > 200 and top[2] < 60, top
        assert bottom[2] > 200 and bottom[0] < 60, bottom

    def test_transparency_is_kept_as_png(self, tmp_path):
        image = Image.new("RGBA", (64, 64), (255, 0, 0, 255))
        image.paste((0, 0, 0, 0), (0, 0, 32, 64))
        # TIFF: never sent as it is, so this is chat.py's own encoding
        mime, sent = sent_image(save(image, tmp_path / "t.tiff"))
        assert (mime, sent.mode) == ("image/png", "RGBA")
        assert sent.getpixel((5, 5))[3] == 0 and sent.getpixel((50, 5)) == (255, 0, 0, 255)

    def test_an_opaque_alpha_channel_becomes_jpeg(self, tmp_path):
        mime, sent = sent_image(save(noise((120, 100)).convert("RGBA"), tmp_path / "opaque.png"))
        assert (mime, sent.mode, sent.size) == ("image/jpeg", "RGB", (120, 100))

    def test_a_palette_gif_with_a_transparent_colour_becomes_png(self, tmp_path):
        image = Image.frombytes("P", (1200, 1200), random.Random(0).randbytes(1200 * 1200))
        image.putpalette(random.Random(1).randbytes(768))
        mime, sent = sent_image(save(image, tmp_path / "t.gif", transparency=0), "low")
        assert (mime, sent.size) == ("image/png", (512, 512))
        alphas = sent.convert("RGBA").getchannel("A")
        assert alphas.getextrema() == (0, 255)

    def test_cmyk_jpeg_is_sent_as_rgb(self, tmp_path):
        mime, sent = sent_image(
            save(Image.new("CMYK", (50, 40), (0, 255, 255, 0)), tmp_path / "print.jpg")
        )
        assert (mime, sent.mode) == ("image/jpeg", "RGB")
        red, green, blue = sent.getpixel((25, 20))
        assert red > 200 and green < 60 and blue < 60

    def test_sixteen_bit_greyscale_is_scaled_not_clipped(self, tmp_path):
        # 30000 / 65535 of full white: about 117 of 255, not 255
        mime, sent = sent_image(save(Image.new("I;16", (40, 40), 30000), tmp_path / "deep.png"))
        assert mime == "image/jpeg"
        assert 110 <= sent.convert("L").getpixel((20, 20)) <= 124

    @pytest.mark.parametrize("suffix", ["gif", "webp"])
    def test_an_animation_sends_its_first_frame(self, tmp_path, suffix):
        frames = [Image.new("RGB", (60, 40), color) for color in ("red", "lime", "blue")]
        path = save(
            frames[0],
            tmp_path / f"anim.{suffix}",
            save_all=True,
            append_images=frames[1:],
            duration=100,
            loop=0,
        )
        _, sent = sent_image(path)
        assert sent.size == (60, 40) and getattr(sent, "n_frames", 1) == 1
        red, green, blue = sent.convert("RGB").getpixel((30, 20))
        assert red > 200 and green < 60 and blue < 60

    def test_a_huge_exif_block_is_no_problem(self, tmp_path):
        exif = orientation(1)
        exif[0x9286] = b"ASCII\x00\x00\x00" + b"x" * 60000  # UserComment, near the 64 KB limit
        path = save(Image.new("RGB", (30, 20), "teal"), tmp_path / "exif.jpg", exif=exif)
        assert os.path.getsize(path) > 60000
        mime, data, _ = prepared(path)
        assert mime == "image/jpeg" and len(data) < 10000  # re-encoded: the comment is not sent
        assert Image.open(io.BytesIO(data)).size == (30, 20)

    @pytest.mark.parametrize(
        "url, note",
        [
            ("https://example.com/cat.jpg", "image https://example.com/cat.jpg: sent as given"),
            ("http://127.0.0.1/x.png", "image http://127.0.0.1/x.png: sent as given"),
            (
                "data:image/png;base64," + "QUJD" * 100,
                "image data:image/png;base64,…(400 characters): sent as given",
            ),
        ],
    )
    def test_urls_pass_through_unchanged(self, tmp_path, url, note):
        part, said = chat.read_attachment(url, "high", chat.Env(cwd=str(tmp_path)), image=True)
        assert (part, said) == (
            {"type": "image_url", "image_url": {"url": url, "detail": "high"}},
            note,
        )


class TestOriginalBytes:
    """A file the API takes as it is goes byte for byte when that is no larger than preparing it."""

    def test_a_screenshot_goes_as_it_is_when_shrinking_would_grow_it(self, tmp_path):
        # 1620x1222: over the pixel budget, yet shrinking it would make it larger
        shot = save(screenshot(), tmp_path / "shot.png")
        mime, data, note = prepared(shot)
        assert (mime, data) == ("image/png", shot.read_bytes())
        assert re.fullmatch(
            rf"image shot\.png: 1620x1222 PNG RGBA, {len(data):,} bytes; sent as it is "
            r"\(re-encoded it would take ([\d,]+) bytes\)",
            note,
        )
        assert int(re.search(r"take ([\d,]+)", note)[1].replace(",", "")) > len(data)

    @pytest.mark.parametrize("quality, as_is", [(30, True), (100, False)])
    def test_a_jpeg_that_needs_no_shrinking_goes_as_it_is_only_if_no_larger(
        self, tmp_path, quality, as_is
    ):
        path = save(noise((200, 150)), tmp_path / "p.jpg", quality=quality)
        _, data, _ = prepared(path)
        assert (data == path.read_bytes()) is as_is
        assert len(data) <= os.path.getsize(path)

    @pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA"])
    @pytest.mark.parametrize("kind", ["PNG", "WEBP", "GIF"])
    def test_plain_modes_of_the_lossless_formats_may_go_as_they_are(self, tmp_path, kind, mode):
        path = save(screenshot((60, 40)).convert(mode), tmp_path / f"x.{kind.lower()}")
        with Image.open(path) as image:
            assert chat.why_not_as_is(image) is None, image.mode

    def test_a_lossless_webp_goes_as_it_is(self, tmp_path):
        path = save(screenshot((300, 200)), tmp_path / "shot.webp", lossless=True)
        mime, data, _ = prepared(path)
        assert (mime, data) == ("image/webp", path.read_bytes())

    @pytest.mark.parametrize(
        "make, reason",
        [
            (
                lambda path: save(Image.new("I;16", (40, 40), 30000), path.with_suffix(".png")),
                "I;16 pixels are converted",
            ),
            (
                lambda path: save(
                    Image.new("CMYK", (40, 40), (0, 255, 255, 0)), path.with_suffix(".jpg")
                ),
                "CMYK pixels are converted",
            ),
            (
                lambda path: save(Image.new("RGB", (40, 40), "red"), path.with_suffix(".bmp")),
                "BMP is not a format the API takes",
            ),
            (
                lambda path: save(
                    Image.new("RGB", (40, 40), "red"), path.with_suffix(".jpg"), exif=orientation(6)
                ),
                "turned upright from its EXIF orientation",
            ),
            (
                lambda path: save(
                    Image.new("RGB", (40, 40), "red"),
                    path.with_suffix(".gif"),
                    save_all=True,
                    append_images=[Image.new("RGB", (40, 40), "blue")],
                ),
                "the first frame of an animation",
            ),
        ],
    )
    def test_what_is_always_converted(self, tmp_path, make, reason):
        path = make(tmp_path / "x")
        _, data, note = prepared(path)
        assert data != path.read_bytes()
        assert note.endswith(f"({reason})")


class TestImagesOnTheWire:
    @pytest.mark.parametrize("detail, size", [(None, (600, 300)), ("low", (512, 256))])
    def test_text_first_then_images_in_order(self, cli, server, tmp_path, detail, size):
        server.reply(json_response(completion("two pics")))
        (tmp_path / "sub").mkdir()
        save(noise((600, 300)), tmp_path / "sub" / "first.png")
        second = "https://example.com/second.jpg"
        options = ("--detail", detail) if detail else ()
        done = cli(
            "--base-url",
            server.url,
            *options,
            "--image",
            "first.png",
            "--image",
            second,
            "Compare",
            cwd=tmp_path / "sub",
        )
        assert (done.code, done.out, done.err) == (0, "two pics\n", "")
        text, first, last = server.bodies[0]["messages"][0]["content"]
        assert text == {"type": "text", "text": "Compare"}
        assert last == {
            "type": "image_url",
            "image_url": drop_nones({"url": second, "detail": detail}),
        }
        assert first["type"] == "image_url" and first["image_url"].get("detail") == detail
        header, data = first["image_url"]["url"].split(",", 1)
        assert header == "data:image/jpeg;base64"
        assert Image.open(io.BytesIO(base64.b64decode(data))).size == size

    NOT_SENDABLE = "not an image chat.py can send (PNG, JPEG, GIF, WebP, BMP, TIFF)"

    @pytest.mark.parametrize(
        "name, content, message",
        [
            ("missing.jpg", None, "cannot read image missing.jpg: No such file or directory"),
            ("folder.png", "folder", "cannot read image folder.png: Is a directory"),
            (
                "empty.png",
                b"",
                f"cannot decode image empty.png: {NOT_SENDABLE}",
            ),
            (
                "notes.jpg",
                b"this is not a picture\n",
                f"cannot decode image notes.jpg: {NOT_SENDABLE}",
            ),
            (
                "cut.jpg",
                "truncated",
                (
                    r"cannot decode image cut\.jpg: image file is truncated \(\d+ bytes not "
                    r"processed\)"
                ),
            ),
            (
                "bomb.png",
                png_header_only(30000, 30000),
                "image bomb.png is too large (over 89,478,485 pixels, or 128 MiB decoded)",
            ),
            # 100 megapixels: Pillow only warns here; chat.py must not decode it either
            (
                "big.png",
                png_header_only(10000, 10000),
                "image big.png is too large (over 89,478,485 pixels, or 128 MiB decoded)",
            ),
        ],
    )
    def test_a_bad_image_is_exit_2_and_nothing_is_sent(
        self, cli, server, tmp_path, name, content, message
    ):
        if content == "folder":
            (tmp_path / name).mkdir()
        elif content == "truncated":
            whole = io.BytesIO()
            noise((200, 150)).save(whole, "JPEG")
            (tmp_path / name).write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
            message = re.compile(message)
        elif content is not None:
            (tmp_path / name).write_bytes(content)
        done = cli("--base-url", server.url, "--image", name, "What is this?")
        assert (done.code, done.out) == (2, "")
        if isinstance(message, re.Pattern):
            assert re.fullmatch(f"error: {message.pattern}\n", done.err), done.err
        else:
            assert done.err == f"error: {message}\n"
        assert server.requests == []

    def test_an_unreadable_file_is_exit_2(self, cli, server, tmp_path):
        path = save(Image.new("RGB", (4, 4)), tmp_path / "secret.png")
        path.chmod(0)
        if os.geteuid() == 0:
            # root reads anything: a real process, without the power to bypass file permissions
            if not shutil.which("setpriv"):
                pytest.skip("running as root without setpriv (util-linux) to drop privileges")
            ran = subprocess.run(
                [
                    "setpriv",
                    "--bounding-set=-dac_override,-dac_read_search",
                    sys.executable,
                    str(CHAT),
                    "--base-url",
                    server.url,
                    "--image",
                    "secret.png",
                    "q",
                ],
                capture_output=True,
                text=True,
                env=cli.environ(FAKE_KEY, None),
                cwd=tmp_path,
                timeout=30,
                check=False,
            )
            done = SimpleNamespace(code=ran.returncode, out=ran.stdout, err=ran.stderr)
        else:
            done = cli("--base-url", server.url, "--image", "secret.png", "q")
        assert (done.code, done.out) == (2, "")
        assert done.err == "error: cannot read image secret.png: Permission denied\n"
        assert server.requests == []

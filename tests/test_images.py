"""Image preparation: sizes per detail level, orientation, formats and modes, broken files.

Every image is generated with Pillow at test time.
"""

import base64
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib

import pytest
from PIL import Image, ImageDraw

import chat
from conftest import completion


def decode_data_url(url: str) -> tuple[str, Image.Image]:
    header, data = url.split(",", 1)
    assert header.startswith("data:image/") and header.endswith(";base64")
    image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
    image.load()
    return header[len("data:"):-len(";base64")], image


def save(image: Image.Image, path, **params):
    image.save(path, **params)
    return str(path)


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


def noise(size) -> Image.Image:
    """A photo-like RGB image: every pixel different, so shrinking it always saves bytes."""
    return Image.merge("RGB", [Image.effect_noise(size, 60) for _ in range(3)])


class TestLocalImages:
    def test_large_photo_is_shrunk_to_the_default_budget(self, tmp_path):
        path = save(Image.effect_mandelbrot((3000, 2000), (-2, -1, 1, 1), 50).convert("RGB"),
                    tmp_path / "photo.jpg")
        mime, image = decode_data_url(chat.image_url(path, None)[0])
        assert mime == "image/jpeg"
        assert image.size == chat.fit_size((3000, 2000), None) == (1536, 1024)

    def test_low_detail_fits_512(self, tmp_path):
        path = save(noise((1200, 900)), tmp_path / "a.png")
        _, image = decode_data_url(chat.image_url(path, "low")[0])
        assert image.size == (512, 384)

    def test_original_detail_keeps_every_pixel(self, tmp_path):
        path = save(Image.new("RGB", (2600, 100), "navy"), tmp_path / "wide.png")
        _, image = decode_data_url(chat.image_url(path, "original")[0])
        assert image.size == (2600, 100)

    def test_small_images_are_never_upscaled(self, tmp_path):
        path = save(Image.new("RGB", (40, 30), "red"), tmp_path / "small.bmp")
        _, image = decode_data_url(chat.image_url(path, "low")[0])
        assert image.size == (40, 30)

    def test_one_pixel_image(self, tmp_path):
        path = save(Image.new("L", (1, 1), 200), tmp_path / "dot.png")
        mime, image = decode_data_url(chat.image_url(path, None)[0])
        assert (mime, image.size) == ("image/png", (1, 1))  # the file itself: smaller than a JPEG

    @pytest.mark.parametrize("detail", [None, "low"])
    def test_exif_orientation_is_applied(self, tmp_path, detail):
        # Stored 800x400, left half red, right half blue; orientation 6 means
        # "rotate 90 degrees clockwise to display": shown 400x800, red on top.
        stored = Image.new("RGB", (800, 400), "blue")
        stored.paste("red", (0, 0, 400, 400))
        exif = Image.Exif()
        exif[0x0112] = 6
        path = save(stored, tmp_path / "turned.jpg", exif=exif)
        _, image = decode_data_url(chat.image_url(path, detail)[0])
        width, height = image.size
        assert (width, height) == ((400, 800) if detail is None else (256, 512))
        top = image.getpixel((width // 2, height // 4))
        bottom = image.getpixel((width // 2, 3 * height // 4))
        assert top[0] > 200 and top[2] < 60, top
        assert bottom[2] > 200 and bottom[0] < 60, bottom

    def test_transparency_is_kept_as_png(self, tmp_path):
        image = Image.new("RGBA", (64, 64), (255, 0, 0, 255))
        image.paste((0, 0, 0, 0), (0, 0, 32, 64))
        mime, sent = decode_data_url(chat.image_url(save(image, tmp_path / "t.png"), None)[0])
        assert mime == "image/png"
        assert sent.mode == "RGBA" and sent.getpixel((5, 5))[3] == 0 and sent.getpixel((50, 5))[3] == 255

    def test_opaque_alpha_channel_becomes_jpeg(self, tmp_path):
        path = save(noise((300, 300)).convert("RGBA"), tmp_path / "opaque.png")
        assert decode_data_url(chat.image_url(path, None)[0])[0] == "image/jpeg"

    def test_palette_gif_with_transparency_becomes_png(self, tmp_path):
        image = noise((1200, 1200)).quantize(64)
        image.paste(0, (0, 0, 600, 600))
        path = save(image, tmp_path / "t.gif", transparency=0)
        mime, sent = decode_data_url(chat.image_url(path, "low")[0])
        assert mime == "image/png" and sent.size == (512, 512)
        assert sent.convert("RGBA").getpixel((1, 1))[3] == 0

    def test_cmyk_jpeg_is_sent_as_rgb(self, tmp_path):
        path = save(Image.new("CMYK", (50, 40), (0, 255, 255, 0)), tmp_path / "print.jpg")
        mime, sent = decode_data_url(chat.image_url(path, None)[0])
        assert mime == "image/jpeg" and sent.mode == "RGB"
        red, green, blue = sent.getpixel((25, 20))
        assert red > 200 and green < 60 and blue < 60

    def test_sixteen_bit_greyscale_is_scaled_not_clipped(self, tmp_path):
        image = Image.new("I;16", (40, 40), 30000)  # 30000 / 65535 of full white
        path = save(image, tmp_path / "deep.png")
        mime, sent = decode_data_url(chat.image_url(path, None)[0])
        assert mime == "image/jpeg"
        assert 110 <= sent.convert("L").getpixel((20, 20)) <= 124

    @pytest.mark.parametrize("suffix", ["gif", "webp"])
    def test_animation_sends_its_first_frame(self, tmp_path, suffix):
        frames = [Image.new("RGB", (60, 40), color) for color in ("red", "lime", "blue")]
        path = tmp_path / f"anim.{suffix}"
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
        mime, sent = decode_data_url(chat.image_url(str(path), None)[0])
        assert sent.size == (60, 40)
        red, green, blue = sent.convert("RGB").getpixel((30, 20))
        assert red > 200 and green < 60 and blue < 60

    def test_huge_exif_block(self, tmp_path):
        exif = Image.Exif()
        exif[0x9286] = b"ASCII\x00\x00\x00" + b"x" * 60000  # UserComment, near the 64 KB limit
        exif[0x0112] = 1
        path = save(Image.new("RGB", (300, 200), "teal"), tmp_path / "exif.jpg", exif=exif)
        assert os.path.getsize(path) > 60000
        _, sent = decode_data_url(chat.image_url(path, None)[0])
        assert sent.size == (300, 200)

    @pytest.mark.parametrize(
        "url", ["https://example.com/cat.jpg", "http://127.0.0.1/x.png", "data:image/png;base64,AAAA"]
    )
    def test_urls_pass_through_unchanged(self, url):
        assert chat.image_url(url, "high") == (url, f"image {chat.elide_base64(url)}: sent as given")


def screenshot(size=(1620, 1222)) -> Image.Image:
    """A screenshot-like RGBA image: lines of text on flat white, one transparent corner."""
    image = Image.new("RGBA", size, "white")
    draw = ImageDraw.Draw(image)
    for y in range(0, size[1], 18):
        draw.text((10, y), "def function(argument): return argument * 2  # a comment " * 3, fill="black")
    draw.rectangle((0, 0, 40, 40), fill=(0, 0, 0, 0))
    return image


def sent_bytes(path, detail=None) -> tuple[str, bytes, str]:
    url, note = chat.image_url(str(path), detail)
    header, data = url.split(",", 1)
    return header.removeprefix("data:").removesuffix(";base64"), base64.b64decode(data), note


class TestOriginalBytes:
    """A file the API takes as it is goes byte for byte when that is no larger than shrinking it."""

    def test_a_screenshot_goes_as_it_is_when_shrinking_would_grow_it(self, tmp_path):
        path = save(screenshot(), tmp_path / "shot.png")
        mime, data, note = sent_bytes(path)
        assert (mime, data) == ("image/png", (tmp_path / "shot.png").read_bytes())
        assert note.startswith(f"image {path}: 1620x1222 PNG RGBA, {len(data):,} bytes; sent as it is")

    def test_a_photo_is_shrunk_when_that_is_smaller(self, tmp_path):
        path = save(noise((2400, 1600)), tmp_path / "photo.png")
        mime, data, note = sent_bytes(path)
        assert mime == "image/jpeg" and len(data) < os.path.getsize(path)
        assert Image.open(io.BytesIO(data)).size == (1536, 1024)
        assert f"sent 1536x1024 JPEG, {len(data):,} bytes (smaller than the file)" in note

    @pytest.mark.parametrize("quality, as_is", [(30, True), (100, False)])
    def test_a_jpeg_that_needs_no_shrinking_goes_as_it_is_only_if_no_larger(self, tmp_path, quality,
                                                                            as_is):
        path = save(noise((400, 300)), tmp_path / "p.jpg", quality=quality)
        _, data, _ = sent_bytes(path)
        assert (data == (tmp_path / "p.jpg").read_bytes()) is as_is
        assert len(data) <= os.path.getsize(path)

    @pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA"])
    @pytest.mark.parametrize("kind", ["PNG", "WEBP", "GIF"])
    def test_plain_modes_of_the_lossless_formats_may_go_as_they_are(self, tmp_path, kind, mode):
        path = save(screenshot((60, 40)).convert(mode), tmp_path / f"x.{kind.lower()}")
        with Image.open(path) as image:
            assert chat.why_not_as_is(image) is None, image.mode

    def test_a_lossless_webp_goes_as_it_is(self, tmp_path):
        path = save(screenshot((600, 400)), tmp_path / "shot.webp", lossless=True)
        mime, data, _ = sent_bytes(path)
        assert (mime, data) == ("image/webp", (tmp_path / "shot.webp").read_bytes())

    @pytest.mark.parametrize(
        "make, reason",
        [
            (lambda path: save(Image.new("I;16", (40, 40), 30000), path.with_suffix(".png")),
             "I;16 pixels are converted"),
            (lambda path: save(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), path.with_suffix(".jpg")),
             "CMYK pixels are converted"),
            (lambda path: save(Image.new("RGB", (40, 40), "red"), path.with_suffix(".bmp")),
             "BMP is not a format the API takes"),
            (lambda path: save(Image.new("RGB", (40, 40), "red"), path.with_suffix(".jpg"),
                               exif=orientation(6)), "turned upright from its EXIF orientation"),
            (lambda path: save(Image.new("RGB", (40, 40), "red"), path.with_suffix(".gif"), save_all=True,
                               append_images=[Image.new("RGB", (40, 40), "blue")]),
             "the first frame of an animation"),
        ],
    )
    def test_what_is_always_converted(self, tmp_path, make, reason):
        path = make(tmp_path / "x")
        _, data, note = sent_bytes(path)
        assert data != open(path, "rb").read()
        assert note.endswith(f"({reason})")


def orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a size in its IHDR chunk but holds almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


class TestBrokenImages:
    def expect_usage_error(self, path, words):
        with pytest.raises(chat.UsageError) as caught:
            chat.image_url(str(path), None)
        message = str(caught.value)
        assert str(path) in message
        assert any(word in message for word in words), message

    def test_missing_file(self, tmp_path):
        self.expect_usage_error(tmp_path / "nope.jpg", ["No such file"])

    def test_directory(self, tmp_path):
        self.expect_usage_error(tmp_path, ["directory"])

    def test_zero_byte_file(self, tmp_path):
        (tmp_path / "empty.png").write_bytes(b"")
        self.expect_usage_error(tmp_path / "empty.png", ["not an image"])

    def test_text_file(self, tmp_path):
        (tmp_path / "notes.jpg").write_text("this is not a picture\n")
        self.expect_usage_error(tmp_path / "notes.jpg", ["not an image"])

    def test_truncated_jpeg(self, tmp_path):
        good = io.BytesIO()
        Image.effect_noise((400, 300), 60).convert("RGB").save(good, "JPEG")
        (tmp_path / "cut.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
        self.expect_usage_error(tmp_path / "cut.jpg", ["truncated", "decode"])

    def test_decompression_bomb(self, tmp_path):
        (tmp_path / "bomb.png").write_bytes(png_header_only(30000, 30000))
        self.expect_usage_error(tmp_path / "bomb.png", ["too large"])

    def test_bomb_under_pillows_error_limit_is_refused_too(self, tmp_path):
        # 100 megapixels: Pillow only warns here; chat.py must not decode it either.
        (tmp_path / "big.png").write_bytes(png_header_only(10000, 10000))
        self.expect_usage_error(tmp_path / "big.png", ["too large"])

    def test_file_without_read_permission(self, run_chat, tmp_path):
        path = tmp_path / "secret.png"
        Image.new("RGB", (4, 4)).save(path)
        path.chmod(0)
        command = [sys.executable, str(chat.__file__), "--base-url", "http://127.0.0.1:9/v1",
                   "--image", str(path), "q"]
        if os.geteuid() == 0:
            # root reads anything; take away its power to bypass file permissions
            if not shutil.which("setpriv"):
                pytest.skip("running as root without setpriv (util-linux) to drop privileges")
            command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
        done = subprocess.run(command, capture_output=True, text=True)
        assert done.returncode == 2
        assert done.stderr == f"error: cannot read image {path}: Permission denied\n"


class TestImagesOnTheWire:
    def test_text_first_then_images_in_order(self, run_chat, httpserver, base_url, tmp_path):
        httpserver.expect_request("/v1/chat/completions").respond_with_json(completion("two pics"))
        first = save(noise((3000, 1500)), tmp_path / "first.png")
        second = "https://example.com/second.jpg"
        done = run_chat("--base-url", base_url, "--image", first, "--image", second, "Compare")
        assert (done.code, done.out, done.err) == (0, "two pics\n", "")
        content = json.loads(httpserver.log[0][0].data)["messages"][0]["content"]
        assert content[0] == {"type": "text", "text": "Compare"}
        assert content[2] == {"type": "image_url", "image_url": {"url": second}}
        assert "detail" not in content[1]["image_url"]
        mime, image = decode_data_url(content[1]["image_url"]["url"])
        assert (mime, image.size) == ("image/jpeg", (1773, 886))  # 1.57 MP budget

    def test_detail_is_sent_in_every_part(self, run_chat, httpserver, base_url, tmp_path):
        httpserver.expect_request("/v1/chat/completions").respond_with_json(completion())
        path = save(noise((900, 900)), tmp_path / "sq.png")
        done = run_chat("--base-url", base_url, "--image", path, "--detail", "low",
                        "--image", "https://x/y.png", "q")
        assert done.code == 0, done.err
        parts = json.loads(httpserver.log[0][0].data)["messages"][0]["content"][1:]
        assert [part["image_url"]["detail"] for part in parts] == ["low", "low"]
        assert decode_data_url(parts[0]["image_url"]["url"])[1].size == (512, 512)

    @pytest.mark.parametrize("name, content", [("missing.jpg", None), ("bad.png", b"not a png"),
                                               ("bomb.png", png_header_only(30000, 30000))])
    def test_bad_image_exits_2_and_sends_nothing(self, run_chat, httpserver, base_url, tmp_path,
                                                 name, content):
        httpserver.expect_request("/v1/chat/completions").respond_with_json(completion())
        if content is not None:
            (tmp_path / name).write_bytes(content)
        done = run_chat("--base-url", base_url, "--image", name, "What is this?")
        assert done.code == 2
        assert done.out == ""
        assert done.err.startswith("error: ") and name in done.err and done.err.count("\n") == 1
        assert "Traceback" not in done.err
        assert httpserver.log == []

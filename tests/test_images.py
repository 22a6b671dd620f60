"""Image loading: every source, every mode, EXIF, the pixel policy, and a clear error for each failure."""

from __future__ import annotations

import base64
import http.server
import io
import random
import struct
import threading
import warnings
import zlib

import pytest
from PIL import Image

from vlrl.adapters.images import ImageError, ImageLimits, decode_image, fit_image, target_size


def png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


RED = Image.new("RGB", (40, 30), (255, 0, 0))


def header_only_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height grayscale pixels, with almost no pixel data: what a
    decompression bomb looks like to `Image.open`, without the memory to build a real one."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(
        b"IEND", b"")


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}

    def do_GET(self):  # noqa: N802
        status, ctype, body = self.routes.get(self.path, (404, "text/plain", b"nope"))
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def http_base():
    _Handler.routes = {
        "/red.png": (200, "image/png", png_bytes(RED)),
        "/page.html": (200, "text/html; charset=utf-8", b"<html>not an image</html>"),
        "/big.png": (200, "image/png", b"\x89PNG" + b"0" * 5000),
    }
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def is_red(img):
    return img.mode == "RGB" and img.getpixel((0, 0)) == (255, 0, 0)


def test_sources_path_relative_path_file_uri_bytes_pil(tmp_path):
    (tmp_path / "imgs").mkdir()
    p = tmp_path / "imgs" / "red.png"
    p.write_bytes(png_bytes(RED))
    assert is_red(decode_image(str(p)))
    assert is_red(decode_image(p))
    assert is_red(decode_image("imgs/red.png", base_dir=tmp_path))
    assert is_red(decode_image(f"file://{p}"))
    assert is_red(decode_image(p.read_bytes()))
    assert is_red(decode_image(RED))


def test_sources_data_uri_and_bare_base64():
    b64 = base64.b64encode(png_bytes(RED)).decode()
    assert is_red(decode_image(f"data:image/png;base64,{b64}"))
    assert is_red(decode_image(b64))


def test_source_http_url(http_base):
    assert is_red(decode_image(f"{http_base}/red.png"))


def test_http_errors_name_the_url(http_base):
    with pytest.raises(ImageError, match=r"/missing.png: HTTP 404"):
        decode_image(f"{http_base}/missing.png")
    with pytest.raises(ImageError, match=r"page.html: the server sent text/html, not an image"):
        decode_image(f"{http_base}/page.html")
    with pytest.raises(ImageError, match=r"big.png: .*over the limit"):
        decode_image(f"{http_base}/big.png", limits=ImageLimits(max_bytes=1000))


def test_unreachable_url_is_a_clear_error():
    with pytest.raises(ImageError, match=r"http://127.0.0.1:9/x.png: could not be fetched"):
        decode_image("http://127.0.0.1:9/x.png", limits=ImageLimits(timeout_s=2))


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ImageError, match=r"nope\.png: file not found"):
        decode_image("nope.png", base_dir=tmp_path)


def test_corrupt_and_empty_files(tmp_path):
    p = tmp_path / "bad.png"
    p.write_bytes(b"this is not an image at all")
    with pytest.raises(ImageError, match=r"bad\.png: not a recognised image format"):
        decode_image(str(p))
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.png: empty"):
        decode_image(str(empty))
    jpeg = png_bytes(Image.new("RGB", (64, 64), (0, 255, 0)), "JPEG")
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(jpeg[: len(jpeg) // 2])
    with pytest.raises(ImageError, match=r"trunc\.jpg: corrupt or truncated"):
        decode_image(str(trunc))


def test_disallowed_scheme():
    with pytest.raises(ImageError, match="ftp:// scheme is not allowed"):
        decode_image("ftp://example.com/a.png")


def test_decompression_bomb_guard(tmp_path):
    p = tmp_path / "wide.png"
    p.write_bytes(png_bytes(Image.new("L", (3000, 3000))))
    with pytest.raises(ImageError, match="decompression-bomb guard"):
        decode_image(str(p), limits=ImageLimits(max_decoded_pixels=1_000_000))


def test_pillows_own_bomb_check_takes_the_guards_path(monkeypatch):
    """Above twice Pillow's MAX_IMAGE_PIXELS (~179 Mpx) `Image.open` raises DecompressionBombError itself,
    before vlrl's guard sees the size; between once and twice it warns, which is an exception when warnings
    are errors. Both end as the guard's message, naming the field to raise."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # undo what a test may loosen
    bomb = header_only_png(20000, 10000)  # 200 Mpx in 69 bytes
    with pytest.raises(ImageError, match=r"^image <69 bytes>: 200000000 pixels is over the limit of 67108864 "
                                         r"\(decompression-bomb guard\); downscale it or raise "
                                         r"model\.image_max_decoded_pixels$"):
        decode_image(bomb)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError,
                           match=r": 100000000 pixels is over the limit of 67108864 \(decompression-bomb"):
            decode_image(header_only_png(10000, 10000))  # 100 Mpx: Pillow warns
        with pytest.raises(ImageError,
                           match=r": 8000x8000 pixels is over the limit of 1000000 \(decompression-bomb"):
            decode_image(header_only_png(8000, 8000), limits=ImageLimits(max_decoded_pixels=1_000_000))
    # a user who allows more than Pillow does is not overruled by Pillow: the file gets decoded (and is short)
    with pytest.raises(ImageError, match=r"corrupt or truncated"):
        decode_image(header_only_png(15000, 13000), limits=ImageLimits(max_decoded_pixels=200_000_000))
    assert Image.MAX_IMAGE_PIXELS == 200_000_000


def fuzzed(seed: int, n: int) -> list[bytes]:
    """`n` damaged copies of small valid images in nine formats (EXIF in the JPEG and TIFF): bytes
    overwritten, some cut short."""
    rng = random.Random(seed)
    base = Image.effect_noise((48, 40), 60).convert("RGB")
    exif = Image.Exif()
    exif[0x0112], exif[0x010F] = 6, "camera"
    files = [png_bytes(base, fmt, **({"exif": exif.tobytes()} if fmt in ("JPEG", "TIFF") else {}))
             for fmt in ("PNG", "JPEG", "GIF", "TIFF", "BMP", "WEBP", "ICO", "TGA", "PPM")]
    out = []
    for i in range(n):
        d = bytearray(files[i % len(files)])
        for _ in range(rng.randint(1, 8)):
            d[rng.randrange(len(d))] = rng.randrange(256)
        out.append(bytes(d[: rng.randrange(1, len(d))] if rng.random() < 0.2 else d))
    return out


def test_damaged_files_of_every_format_fail_as_image_errors():
    """Found by this fuzzing before the fix: DecompressionBombError from a BMP whose header grew, and
    "Tag data larger than file" warnings from broken EXIF/TIFF tags (exceptions under warnings-as-errors)."""
    kinds = set()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for data in fuzzed(1, 900):
            try:
                img = decode_image(data)
                kinds.add("decoded")
                assert img.mode == "RGB"
            except ImageError as e:
                kinds.update(k for k in ("corrupt or truncated", "not a recognised", "decompression-bomb")
                             if k in str(e))
    assert kinds == {"decoded", "corrupt or truncated", "not a recognised", "decompression-bomb"}


def test_modes_become_rgb():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent: flattened onto white
    assert decode_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (8, 8), (0, 0, 0, 128))
    assert decode_image(half).getpixel((0, 0)) == (127, 127, 127)
    gray = Image.new("L", (8, 8), 77)
    assert decode_image(gray).getpixel((0, 0)) == (77, 77, 77)
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    assert decode_image(png_bytes(cmyk, "JPEG")).getpixel((4, 4))[0] > 200
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 255] + [0] * 765)
    assert decode_image(png_bytes(pal)).getpixel((0, 0)) == (0, 0, 255)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 0
    assert decode_image(png_bytes(pal_t, transparency=0)).getpixel((0, 0)) == (255, 255, 255)
    deep = Image.new("I;16", (8, 8), 65535)
    assert decode_image(deep).getpixel((0, 0)) == (255, 255, 255)
    premultiplied = Image.new("La", (8, 8), (100, 128))  # Pillow converts La only to LA
    assert decode_image(premultiplied).getpixel((0, 0)) == (227, 227, 227)  # 199 at alpha 128 over white
    for mode in ("1", "LA", "PA", "RGBa", "RGBX", "YCbCr", "LAB", "HSV", "I", "F", "I;16B", "I;16L"):
        assert decode_image(Image.new(mode, (8, 8))).mode == "RGB", mode


def test_exif_orientation_is_honoured():
    # A 40x20 image whose left half is red, stored with EXIF orientation 6 (rotate 90 degrees clockwise).
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    loaded = decode_image(png_bytes(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert loaded.size == (20, 40)
    assert loaded.getpixel((10, 5))[0] > 200  # the red half is now on top


def test_pixel_policy_matches_the_processor(adapter):
    """The trainer resizes once; the processor then keeps the size, so both agree on the grid."""
    for w, h in [(40, 30), (500, 300), (64, 64), (1000, 90), (33, 97)]:
        img = Image.new("RGB", (w, h), (10, 20, 30))
        fitted = adapter.load_image(img)
        tw, th = target_size(w, h, adapter.cfg.min_pixels, adapter.cfg.max_pixels, adapter.factor)
        assert fitted.size == (tw, th)
        assert tw % 32 == 0 and th % 32 == 0
        assert adapter.cfg.min_pixels <= tw * th <= adapter.cfg.max_pixels
        size = {"shortest_edge": adapter.cfg.min_pixels, "longest_edge": adapter.cfg.max_pixels}
        ours = adapter.processor.image_processor(images=[fitted], return_tensors="pt", size=size)
        theirs = adapter.processor.image_processor(images=[img], return_tensors="pt", size=size)
        assert (ours["image_grid_thw"].tolist() == theirs["image_grid_thw"].tolist()
                == [[1, th // 16, tw // 16]])


def test_extreme_aspect_ratio_is_a_clear_error():
    with pytest.raises(ImageError, match="1x4000 cannot be used"):
        fit_image(Image.new("RGB", (1, 4000)), 64 * 64, 128 * 128, 32)

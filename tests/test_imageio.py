"""Reading/writing real photos: formats, orientation, metadata, gray, 16 bit, alpha, errors."""

import io
import itertools
import os
import struct
import warnings
import zlib
from dataclasses import replace

import imagecodecs
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image, ImageCms, ImageOps
from skimage import data
from skimage.color import rgb2lab

from teasr_cli import imageio as tio
from teasr_cli.errors import ImageReadError, ImageWriteError, TeasrError
from teasr_cli.imageio import (
    Picture,
    from_pil,
    output_format,
    read_image,
    replace_pixels,
    to_pil,
    upscale_alpha,
    write_image,
)

ORIENTATION, MAKE, MODEL, EXIF_IFD, DATE_ORIGINAL = 0x0112, 0x010F, 0x0110, 0x8769, 0x9003


@pytest.fixture(scope="module")
def photo():
    """A non-square crop of a real photo, so that rotations show."""
    return np.ascontiguousarray(data.astronaut()[40:136, 100:228])  # 96 x 128 x 3


@pytest.fixture(scope="module")
def gray_photo():
    return np.ascontiguousarray(data.camera()[100:180, 150:250])  # 80 x 100


@pytest.fixture(scope="module")
def deep(photo):
    """16-bit RGB whose values are not multiples of 257 (an 8-bit path would lose them)."""
    noise = np.random.default_rng(0).integers(1, 200, photo.shape)
    return (photo.astype(np.uint16) * 256 + noise).astype(np.uint16)


def as_u8(t):
    return np.rint(t.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def as_u16(t):
    return np.rint(t.permute(1, 2, 0).numpy() * 65535).astype(np.uint16)


def srgb_icc():
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def camera_exif(orientation=1):
    exif = Image.Exif()
    exif[MAKE], exif[MODEL], exif[ORIENTATION] = "TestCam", "X100", orientation
    exif.get_ifd(EXIF_IFD)[DATE_ORIGINAL] = "2024:05:06 07:08:09"
    return exif.tobytes()


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize(
    "fmt, ext, lossless",
    [
        ("JPEG", "jpg", False),
        ("PNG", "png", True),
        ("WEBP", "webp", False),
        ("TIFF", "tif", True),
        ("BMP", "bmp", True),
    ],
)
def test_reads_common_formats(tmp_path, photo, fmt, ext, lossless):
    path = tmp_path / f"a.{ext}"
    Image.fromarray(photo).save(path, format=fmt)
    pic = read_image(path)
    assert (pic.format, pic.bits, pic.gray, pic.alpha) == (fmt, 8, False, None)
    assert pic.rgb.dtype == torch.float32 and pic.rgb.shape == (3, 96, 128) and pic.size == (96, 128)
    assert 0 <= pic.rgb.min() and pic.rgb.max() <= 1
    got = as_u8(pic.rgb)
    np.testing.assert_array_equal(got, np.asarray(Image.open(path).convert("RGB")))
    if lossless:
        np.testing.assert_array_equal(got, photo)
    else:
        assert np.abs(got.astype(int) - photo).mean() < 4


@pytest.mark.parametrize(
    "fmt, ext", [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("TIFF", "tiff"), ("BMP", "bmp")]
)
def test_write_then_read_back(tmp_path, photo, fmt, ext):
    pic = from_pil(Image.fromarray(photo))
    out = write_image(pic, tmp_path / f"out.{ext}")
    assert out == tmp_path / f"out.{ext}" and sorted(os.listdir(tmp_path)) == [f"out.{ext}"]
    back = Image.open(out)
    assert back.format == fmt and back.mode == "RGB"
    assert np.abs(np.asarray(back).astype(int) - photo).mean() < (3 if fmt in ("JPEG", "WEBP") else 1e-9)


# ---------------------------------------------------------------- orientation and metadata


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(tmp_path, photo, orientation):
    path = tmp_path / "o.png"
    Image.fromarray(photo).save(path, exif=camera_exif(orientation))
    pic = read_image(path)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(path)))
    np.testing.assert_array_equal(as_u8(pic.rgb), expected)
    exif = Image.Exif()
    exif.load(pic.exif)
    assert exif[ORIENTATION] == 1 and exif[MAKE] == "TestCam"


def test_jpeg_orientation_6_is_applied_once(tmp_path, photo):
    src = tmp_path / "phone.jpg"
    Image.fromarray(photo).save(src, exif=camera_exif(6), quality=95)
    pic = read_image(src)
    assert pic.size == (128, 96)  # rotated: portrait now
    rotated = np.rot90(photo, -1)  # orientation 6 = the camera was turned clockwise
    assert np.abs(as_u8(pic.rgb).astype(int) - rotated).mean() < 3
    out = write_image(pic, tmp_path / "out.jpg")
    assert Image.open(out).getexif()[ORIENTATION] == 1
    again = read_image(out)
    assert again.size == (128, 96) and np.abs(as_u8(again.rgb).astype(int) - rotated).mean() < 4


@pytest.mark.parametrize("ext", ["jpg", "png", "webp", "tif"])
def test_icc_and_exif_survive_a_round_trip(tmp_path, photo, ext):
    icc = srgb_icc()
    src = tmp_path / "src.jpg"
    Image.fromarray(photo).save(src, icc_profile=icc, exif=camera_exif(), quality=95)
    pic = read_image(src)
    assert pic.icc_profile == icc
    back = Image.open(write_image(pic, tmp_path / f"out.{ext}"))
    assert back.info["icc_profile"] == icc
    exif = back.getexif()
    assert (exif[MAKE], exif[MODEL]) == ("TestCam", "X100")
    assert exif.get_ifd(EXIF_IFD)[DATE_ORIGINAL] == "2024:05:06 07:08:09"


def test_tiff_layout_tags_do_not_leak_into_exif(tmp_path, photo):
    src = tmp_path / "src.tif"
    Image.fromarray(photo).save(src, exif=camera_exif(3))
    pic = read_image(src)
    np.testing.assert_array_equal(as_u8(pic.rgb), photo[::-1, ::-1])
    exif = Image.Exif()
    exif.load(pic.exif)
    assert exif[MAKE] == "TestCam" and exif.get(ORIENTATION, 1) == 1
    assert not {256, 257, 273, 279} & set(exif)  # width, height, strip offsets/counts


# ---------------------------------------------------------------- grayscale and 16 bit


def test_gray_stays_gray(tmp_path, gray_photo):
    src = tmp_path / "g.png"
    Image.fromarray(gray_photo).save(src)
    pic = read_image(src)
    assert pic.gray and pic.bits == 8 and pic.rgb.shape == (3, 80, 100)
    assert torch.equal(pic.rgb[0], pic.rgb[1]) and torch.equal(pic.rgb[0], pic.rgb[2])
    for ext in ("png", "jpg", "tif", "bmp"):
        back = Image.open(write_image(pic, tmp_path / f"out.{ext}"))
        assert back.mode == "L", ext
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out.png")), gray_photo)
    assert Image.open(write_image(pic, tmp_path / "out.webp")).mode == "RGB"  # WebP has no gray


def test_gray16_png_round_trip(tmp_path, gray_photo):
    values = gray_photo.astype(np.uint16) * 256 + np.arange(gray_photo.size).reshape(gray_photo.shape) % 251
    src = tmp_path / "g16.png"
    Image.fromarray(values.astype(np.uint16)).save(src)
    pic = read_image(src)
    assert pic.gray and pic.bits == 16
    np.testing.assert_array_equal(as_u16(pic.rgb)[..., 0], values)
    img = to_pil(pic)
    assert img.mode == "I;16"
    np.testing.assert_array_equal(np.asarray(img), values)
    back = Image.open(write_image(pic, tmp_path / "out.png"))
    assert back.mode.startswith("I") and np.array_equal(np.asarray(back), values)
    again = read_image(tmp_path / "out.png")
    assert again.gray and again.bits == 16 and torch.equal(again.rgb, pic.rgb)


@pytest.mark.parametrize("kind", ["png", "tiff", "tiff-lzw", "tiff-planar"])
def test_rgb16_read_keeps_16_bit_precision(tmp_path, deep, kind):
    src = tmp_path / ("d.png" if kind == "png" else "d.tif")
    if kind == "png":
        src.write_bytes(imagecodecs.png_encode(deep))  # libpng with adaptive row filters
    else:
        planar = kind == "tiff-planar"
        tifffile.imwrite(
            src,
            np.moveaxis(deep, -1, 0) if planar else deep,
            photometric="rgb",
            planarconfig="separate" if planar else "contig",
            compression="lzw" if kind == "tiff-lzw" else None,
        )
    pic = read_image(src)
    assert pic.bits == 16 and not pic.gray and pic.alpha is None
    np.testing.assert_array_equal(as_u16(pic.rgb), deep)


def test_rgb16_tiff_orientation(tmp_path, deep):
    src = tmp_path / "d.tif"
    tifffile.imwrite(src, deep, photometric="rgb", extratags=[(ORIENTATION, "H", 1, 8, True)])
    pic = read_image(src)
    assert pic.size == (128, 96)
    np.testing.assert_array_equal(as_u16(pic.rgb), np.rot90(deep, 1))  # 8: turned counter-clockwise


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_rgb16_write_keeps_16_bit_precision_and_metadata(tmp_path, deep, ext):
    icc = srgb_icc()
    src = tmp_path / "src.png"
    src.write_bytes(imagecodecs.png_encode(deep))
    pic = replace(read_image(src), icc_profile=icc, exif=camera_exif())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = write_image(pic, tmp_path / f"out.{ext}")
    reread = read_image(out)
    assert reread.bits == 16 and reread.icc_profile == icc
    np.testing.assert_array_equal(as_u16(reread.rgb), deep)
    back = imagecodecs.png_decode(out.read_bytes()) if ext == "png" else tifffile.imread(out)
    np.testing.assert_array_equal(back, deep)  # an independent decoder agrees
    if ext == "png":
        assert Image.open(out).getexif()[MAKE] == "TestCam" and not caught
    else:  # tifffile cannot write EXIF: said, not silent
        assert any("EXIF" in str(w.message) for w in caught)
    lossy = read_image(write_image(pic, tmp_path / "out.jpg"))
    assert lossy.bits == 8  # JPEG holds 8 bit only


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_rgba16_keeps_alpha_at_16_bit(tmp_path, deep, ext):
    alpha = np.linspace(0, 65535, deep.shape[1]).astype(np.uint16)[None, :, None].repeat(deep.shape[0], 0) | 1
    rgba = np.concatenate([deep, alpha], -1)
    src = tmp_path / "a16.png"
    src.write_bytes(imagecodecs.png_encode(rgba))
    pic = read_image(src)
    assert pic.bits == 16 and pic.alpha.shape == (1, 96, 128)
    np.testing.assert_array_equal(as_u16(pic.alpha)[..., 0], alpha[..., 0])
    out = write_image(pic, tmp_path / f"out.{ext}")
    back = imagecodecs.png_decode(out.read_bytes()) if ext == "png" else tifffile.imread(out)
    np.testing.assert_array_equal(back, rgba)
    again = read_image(out)
    assert torch.equal(again.rgb, pic.rgb) and torch.equal(again.alpha, pic.alpha)


# ---------------------------------------------------------------- alpha, palette, CMYK


def rgba_photo(photo):
    alpha = np.tile(np.linspace(0, 255, photo.shape[1]).astype(np.uint8), (photo.shape[0], 1))
    alpha[:20] = 0
    return np.dstack([photo, alpha])


def test_alpha_is_separated_upscaled_and_reattached(tmp_path, photo):
    rgba = rgba_photo(photo)
    src = tmp_path / "a.png"
    Image.fromarray(rgba).save(src)
    pic = read_image(src)
    assert pic.alpha.shape == (1, 96, 128) and not pic.gray
    np.testing.assert_array_equal(as_u8(pic.rgb), photo)
    np.testing.assert_array_equal(as_u8(pic.alpha)[..., 0], rgba[..., 3])
    big = torch.nn.functional.interpolate(pic.rgb[None], scale_factor=2, mode="bicubic")[0]
    up = replace_pixels(pic, big)
    assert up.alpha.shape == (1, 192, 256) and up.icc_profile == pic.icc_profile
    assert 0 <= up.rgb.min() and up.rgb.max() <= 1  # bicubic overshoot clamped
    pil_lanczos = np.asarray(Image.fromarray(rgba[..., 3]).resize((256, 192), Image.Resampling.LANCZOS))
    assert np.abs(as_u8(up.alpha)[..., 0].astype(int) - pil_lanczos).max() <= 1
    back = Image.open(write_image(up, tmp_path / "out.png"))
    assert back.mode == "RGBA" and back.size == (256, 192)
    assert np.asarray(back)[:32, :, 3].max() == 0  # the transparent band stays transparent


def test_upscale_alpha_properties():
    flat = torch.full((1, 8, 10), 0.25)
    assert torch.allclose(upscale_alpha(flat, (32, 40)), torch.full((1, 32, 40), 0.25), atol=1e-6)
    step = torch.zeros(1, 8, 8)
    step[:, :, 4:] = 1
    up = upscale_alpha(step, (32, 32))
    assert up.shape == (1, 32, 32) and up.min() >= 0 and up.max() <= 1  # Lanczos ringing clipped
    assert up[0, :, 0].max() == 0 and up[0, :, -1].min() == 1


def test_jpeg_output_drops_alpha_with_a_warning(tmp_path, photo):
    pic = from_pil(Image.fromarray(rgba_photo(photo)))
    with pytest.warns(UserWarning, match="alpha"):
        out = write_image(pic, tmp_path / "out.jpg")
    assert Image.open(out).mode == "RGB"


def test_gray_alpha_and_palette_transparency(tmp_path, photo, gray_photo):
    la = np.dstack([gray_photo, np.full_like(gray_photo, 128)])
    Image.fromarray(la).save(tmp_path / "la.png")
    pic = read_image(tmp_path / "la.png")
    assert pic.gray and pic.alpha is not None
    assert Image.open(write_image(pic, tmp_path / "la_out.png")).mode == "LA"
    pal = Image.fromarray(photo).quantize(32)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "p.png")
    pic = read_image(tmp_path / "p.png")
    idx = np.asarray(pal)
    assert not pic.gray and pic.alpha is not None
    np.testing.assert_array_equal(as_u8(pic.alpha)[..., 0], np.where(idx == 0, 0, 255))
    np.testing.assert_array_equal(as_u8(pic.rgb), np.asarray(pal.convert("RGB")))


def test_palette_without_transparency_is_rgb(tmp_path, photo):
    pal = Image.fromarray(photo).quantize(64)
    pal.save(tmp_path / "p.bmp")
    pic = read_image(tmp_path / "p.bmp")
    assert pic.alpha is None and not pic.gray
    np.testing.assert_array_equal(as_u8(pic.rgb), np.asarray(pal.convert("RGB")))


def test_cmyk_jpeg_without_profile(tmp_path, photo):
    Image.fromarray(photo).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    pic = read_image(tmp_path / "c.jpg")
    assert pic.icc_profile is None and pic.rgb.shape == (3, 96, 128)
    assert np.abs(as_u8(pic.rgb).astype(int) - photo).mean() < 4


def cmyk_profile():
    """A tiny ICC v2 CMYK profile whose inks are deliberately odd: cyan prints red, magenta
    green, yellow blue, no ink is black. Naive 1 - C conversion would give the opposite."""
    s15 = lambda v: struct.pack(">i", round(v * 65536))  # noqa: E731
    clut = []
    for c, m, y, k in itertools.product((0, 1), repeat=4):
        L, a, b = rgb2lab(np.array([[[c, m, y]]], float) * (1 - k))[0, 0]
        clut += [round(L * 652.8), round((a + 128) * 256), round((b + 128) * 256)]  # v2 Lab16
    lut = (
        b"mft2"
        + bytes(4)
        + bytes([4, 3, 2, 0])
        + b"".join(s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
        + struct.pack(">HH", 2, 2)
        + struct.pack(">8H", *[0, 65535] * 4)
        + struct.pack(f">{len(clut)}H", *clut)
        + struct.pack(">6H", *[0, 65535] * 3)
    )
    white = s15(0.9642) + s15(1.0) + s15(0.8249)
    tags = [(b"A2B0", lut + bytes(-len(lut) % 4)), (b"wtpt", b"XYZ " + bytes(4) + white)]
    offset, table, body = 128 + 4 + 12 * len(tags), b"", b""
    for sig, blob in tags:
        table += sig + struct.pack(">II", offset + len(body), len(blob))
        body += blob
    head = (
        struct.pack(">I", offset + len(body))
        + bytes(4)
        + bytes([2, 0x10, 0, 0])
        + b"prtrCMYKLab "
        + bytes(12)
        + b"acsp"
        + bytes(28)
        + white
        + bytes(48)
    )
    return head + struct.pack(">I", len(tags)) + table + body


def test_cmyk_jpeg_uses_its_profile(tmp_path):
    patches = np.zeros((16, 64, 4), np.uint8)
    for i, ink in enumerate([(255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (0, 0, 0, 0)]):
        patches[:, 16 * i : 16 * (i + 1)] = ink
    Image.fromarray(patches, "CMYK").save(tmp_path / "c.jpg", icc_profile=cmyk_profile(), quality=95)
    pic = read_image(tmp_path / "c.jpg")
    assert pic.icc_profile[16:20] == b"RGB "  # pixels are sRGB now, and so is the profile
    centers = as_u8(pic.rgb)[8, 8::16].astype(int)
    assert np.abs(centers[0] - [255, 0, 0]).max() < 12  # red, not cyan
    assert np.abs(centers[1] - [0, 255, 0]).max() < 12
    assert centers[2].argmax() == 2 and centers[2][2] > 240
    assert centers[3].max() < 12  # black, not white


# ---------------------------------------------------------------- animation


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_first_frame_with_warning(tmp_path, photo, fmt):
    frames = [Image.fromarray(photo), Image.fromarray(255 - photo), Image.fromarray(photo[::-1])]
    path = tmp_path / f"anim.{fmt.lower()}"
    frames[0].save(
        path,
        format=fmt,
        save_all=True,
        append_images=frames[1:],
        duration=100,
        **({"lossless": True} if fmt == "WEBP" else {}),
    )
    with pytest.warns(UserWarning, match="animated.*only the first frame is upscaled"):
        pic = read_image(path)
    first = np.asarray(Image.open(path).convert("RGB"))
    np.testing.assert_array_equal(as_u8(pic.rgb), first)
    assert np.abs(first.astype(int) - photo).mean() < 10  # the first frame, not the negative


# ---------------------------------------------------------------- read errors


def one_line_read_error(path, **kw):
    with pytest.raises(ImageReadError) as err:
        read_image(path, **kw)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_read_errors(tmp_path):
    assert "no such file" in one_line_read_error(tmp_path / "missing.png")
    assert "folder" in one_line_read_error(tmp_path)
    (tmp_path / "notes.png").write_text("these are not pixels\n")
    assert "not an image" in one_line_read_error(tmp_path / "notes.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert "empty" in one_line_read_error(tmp_path / "empty.jpg")


@pytest.mark.parametrize(
    "fmt, ext", [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("TIFF", "tif"), ("BMP", "bmp"), ("PNG16", "png")]
)
def test_truncated_files_never_load(tmp_path, photo, deep, fmt, ext, monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # a caller's global must not matter
    if fmt == "PNG16":
        blob = imagecodecs.png_encode(deep)
    else:
        buf = io.BytesIO()
        Image.fromarray(photo).save(buf, format=fmt)
        blob = buf.getvalue()
    path = tmp_path / f"cut.{ext}"
    path.write_bytes(blob[: len(blob) // 2])
    assert "corrupt or truncated" in one_line_read_error(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def png_header_only(width, height):
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


def test_zero_size_and_corrupt_header(tmp_path):
    (tmp_path / "zero.png").write_bytes(png_header_only(0, 10))
    assert "empty (0x10 pixels)" in one_line_read_error(tmp_path / "zero.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff" + bytes(50))
    assert "JPEG" in one_line_read_error(tmp_path / "bad.jpg")


def test_max_pixels(tmp_path, photo, monkeypatch):
    path = tmp_path / "a.png"
    Image.fromarray(photo).save(path)
    msg = one_line_read_error(path, max_pixels=10_000)
    assert "128x96" in msg and "--max-pixels N" in msg and "10,000" in msg
    assert read_image(path, max_pixels=128 * 96).size == (96, 128)
    opened = Image.open(path)
    # Pillow's own (global) bomb limit neither overrides ours nor gets lost.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert read_image(path).size == (96, 128) and read_image(path, max_pixels=None).size == (96, 128)
    assert Image.MAX_IMAGE_PIXELS == 1000
    with pytest.raises(ImageReadError, match="--max-pixels"):
        from_pil(opened, max_pixels=100)
    assert from_pil(opened).size == (96, 128)


# ---------------------------------------------------------------- from_pil / to_pil


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "I;16"])
def test_from_pil_to_pil_round_trip(photo, mode):
    rgba = rgba_photo(photo)
    src = {
        "L": Image.fromarray(photo).convert("L"),
        "LA": Image.fromarray(rgba).convert("LA"),
        "RGB": Image.fromarray(photo),
        "RGBA": Image.fromarray(rgba),
        "I;16": Image.fromarray((photo[..., 0].astype(np.uint16) * 257 + 3)),
    }[mode]
    assert src.mode == mode
    icc = srgb_icc() if mode.startswith(("RGB",)) else None
    if icc:
        src.info["icc_profile"] = icc
    pic = from_pil(src)
    assert pic.gray == (mode in ("L", "LA", "I;16")) and pic.bits == (16 if mode == "I;16" else 8)
    back = to_pil(pic)
    assert back.mode == mode and back.info.get("icc_profile") == icc
    np.testing.assert_array_equal(np.asarray(back), np.asarray(src))


def test_to_pil_drops_a_gray_profile_on_colour_output(photo):
    pic = from_pil(Image.fromarray(photo))
    pic = replace(pic, icc_profile=ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes())
    assert "icc_profile" not in to_pil(pic).info  # a Lab profile does not describe RGB pixels


# ---------------------------------------------------------------- writing


def test_output_format():
    assert output_format("x/out.JPG") == "JPEG" and output_format("o.jpeg") == "JPEG"
    assert output_format("o.tif") == output_format("o.tiff") == "TIFF"
    assert output_format("o.png", "webp") == "WEBP" and output_format("o", ".BMP") == "BMP"
    with pytest.raises(TeasrError, match=r"\.jpg.*\.png.*\.webp.*\.tiff.*\.bmp"):
        output_format("out.xyz")
    with pytest.raises(TeasrError, match="'heic'"):
        output_format("out.png", "heic")


def test_format_option_overrides_suffix(tmp_path, photo):
    out = write_image(from_pil(Image.fromarray(photo)), tmp_path / "out.png", fmt="jpg")
    assert Image.open(out).format == "JPEG"


def test_write_errors(tmp_path, photo):
    pic = from_pil(Image.fromarray(photo))
    with pytest.raises(ImageWriteError, match="does not exist"):
        write_image(pic, tmp_path / "no" / "such" / "out.png")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ImageWriteError):
        write_image(pic, tmp_path / "file" / "out.png")
    target = write_image(pic, tmp_path / "out.png")
    before = target.read_bytes()
    with pytest.raises(ImageWriteError, match="already exists"):
        write_image(pic, target, fmt="jpg", overwrite=False)
    assert target.read_bytes() == before
    write_image(pic, target, quality=50, fmt="jpg")  # overwrite=True replaces it
    assert Image.open(target).format == "JPEG"
    if os.geteuid() != 0:  # root ignores permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ImageWriteError, match="cannot write"):
            write_image(pic, locked / "out.png")


@pytest.mark.parametrize("existing", [False, True])
def test_failed_save_leaves_nothing_behind(tmp_path, photo, monkeypatch, existing):
    pic = from_pil(Image.fromarray(photo))
    target = tmp_path / "out.png"
    if existing:
        target.write_bytes(b"old image")

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half of a file")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(ImageWriteError, match="disk full") as err:
        write_image(pic, target)
    assert "\n" not in str(err.value)
    assert os.listdir(tmp_path) == (["out.png"] if existing else [])
    if existing:
        assert target.read_bytes() == b"old image"


def test_written_file_has_normal_permissions(tmp_path, photo):
    out = write_image(from_pil(Image.fromarray(photo)), tmp_path / "out.png")
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_picture_is_plain_data(photo):
    pic = from_pil(Image.fromarray(photo))
    assert isinstance(pic, Picture) and pic.exif is None and pic.icc_profile is None
    assert tio.DEFAULT_MAX_PIXELS == 100_000_000


# ---------------------------------------------------------------- the package's one lister and atomic writer


def test_find_images_lists_image_files_only_sorted(tmp_path, photo):
    (tmp_path / "sub" / "out").mkdir(parents=True)
    for name in ("b.PNG", "a.jpg", ".hidden.png", "notes.txt", "sub/c.webp", "sub/out/d.png"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()  # a folder with an image suffix is not an image
    names = lambda files: [p.relative_to(tmp_path).as_posix() for p in files]  # noqa: E731
    assert names(tio.find_images(tmp_path)) == ["a.jpg", "b.PNG"]
    assert names(tio.find_images(tmp_path, recursive=True)) == ["a.jpg", "b.PNG", "sub/c.webp", "sub/out/d.png"]
    assert names(tio.find_images(tmp_path, recursive=True, exclude=tmp_path / "sub" / "out")) == [
        "a.jpg",
        "b.PNG",
        "sub/c.webp",
    ]
    assert names(tio.find_images(tmp_path, "a*")) == ["a.jpg"] and tio.find_images(tmp_path / "sub" / "out" / "x") == []


@pytest.mark.parametrize("existing", [False, True])
def test_atomic_path_replaces_on_success_and_keeps_the_old_file_on_failure(tmp_path, existing):
    target = tmp_path / "results.json"
    if existing:
        target.write_text("old")
    with pytest.raises(RuntimeError):
        with tio.atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".json" and tmp.name.startswith(".")
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == (["results.json"] if existing else [])
    assert not existing or target.read_text() == "old"
    tio.write_text_atomic(target, "new")
    assert os.listdir(tmp_path) == ["results.json"] and target.read_text() == "new"


def test_atomic_path_replaces_a_whole_folder(tmp_path):
    final = tmp_path / "ckpt-0000002"
    final.mkdir()
    (final / "stale.safetensors").write_text("old")
    with tio.atomic_path(final) as tmp:
        tmp.mkdir()
        assert not (tmp / "state.json").exists() and (final / "stale.safetensors").exists()  # old one until done
        (tmp / "state.json").write_text("{}")
    assert os.listdir(tmp_path) == ["ckpt-0000002"] and os.listdir(final) == ["state.json"]


@pytest.mark.parametrize("kind", ["rgb-jpeg-rotated", "gray", "rgba", "rgb16", "palette"])
def test_read_rgb8_gives_read_images_pixels_in_8_bit(tmp_path, photo, gray_photo, deep, kind):
    """The training reader: the same upright RGB as read_image, as uint8 (exact for 8-bit files), alpha dropped."""
    path = tmp_path / ("a.jpg" if kind.endswith("jpeg-rotated") else "a.png")
    if kind == "rgb-jpeg-rotated":
        exif = Image.Exif()
        exif[ORIENTATION] = 8
        Image.fromarray(photo).save(path, quality=95, exif=exif)
    elif kind == "gray":
        Image.fromarray(gray_photo).save(path)
    elif kind == "rgba":
        Image.fromarray(np.dstack([photo, photo[..., :1]])).save(path)
    elif kind == "rgb16":
        path.write_bytes(imagecodecs.png_encode(deep))
    else:
        Image.fromarray(photo).quantize(64).save(path)
    x = tio.read_rgb8(path)
    ref = (read_image(path).rgb * 255).round().to(torch.uint8)
    assert x.dtype == torch.uint8 and x.shape[0] == 3 and torch.equal(x, ref)
    if kind == "rgb-jpeg-rotated":
        assert x.shape[1:] == (photo.shape[1], photo.shape[0])  # turned upright: 128 x 96
    if kind == "rgb16":  # rounded, not truncated: 0x12ff -> 0x13
        assert torch.equal(x, torch.from_numpy(np.rint(deep / 257.0).astype(np.uint8)).permute(2, 0, 1))

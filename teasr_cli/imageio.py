"""Image reading and writing around the upscaler.

The pipeline only ever sees a (3, H, W) float RGB tensor in [0, 1]. Everything
else a user's file carries travels beside it in a `Picture` and is put back on
write: alpha (upscaled separately), grayscale-ness, 16-bit depth, the ICC
profile and EXIF (with the orientation already applied to the pixels).

Pillow decodes almost everything, but truncates 16-bit colour to 8 bit, so
16-bit PNG goes through imagecodecs (libpng) and 16-bit TIFF through tifffile.
"""

from __future__ import annotations

import io
import os
import secrets
import shutil
import threading
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import imagecodecs
import numpy as np
import tifffile
import torch
from PIL import Image, ImageCms, ImageFile, UnidentifiedImageError

from .errors import ImageReadError, ImageWriteError

DEFAULT_MAX_PIXELS = 100_000_000  # input decompression-bomb limit, overridable

SUFFIX_FORMATS = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".bmp": "BMP",
}
IMAGE_SUFFIXES = tuple(SUFFIX_FORMATS)  # what folder-walking commands (batch, eval, train) pick up
ORIENTATION = 0x0112
# TIFF tags that describe the file layout of the source, not the photo: they must
# not travel as EXIF into another file.
_TIFF_LAYOUT_TAGS = (
    254,
    255,
    256,
    257,
    258,
    259,
    262,
    266,
    273,
    277,
    278,
    279,
    280,
    281,
    284,
    317,
    320,
    322,
    323,
    324,
    325,
    338,
    339,
    340,
    341,
    530,
    531,
    532,
    34675,
)
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as Pillow's RGB -> L


@dataclass
class Picture:
    rgb: torch.Tensor  # (3, H, W) float32 in [0, 1]; grayscale replicated to 3 channels
    alpha: torch.Tensor | None  # (1, H, W) float32 in [0, 1] or None
    gray: bool  # source was grayscale -> written back as grayscale
    bits: int  # 8 or 16
    icc_profile: bytes | None
    exif: bytes | None  # Orientation already reset to 1 (it is applied to the pixels)
    format: str | None  # source format name from Pillow, e.g. "JPEG"

    @property
    def size(self) -> tuple[int, int]:
        """(H, W)."""
        return tuple(self.rgb.shape[-2:])


# ---------------------------------------------------------------- reading

_PIL_LOCK = threading.Lock()


@contextmanager
def _pil_guard():
    """Pillow's bomb limit and truncation switch are process globals: pin them while we
    decode so that our `max_pixels` is the only limit and a cut file never loads."""
    with _PIL_LOCK:
        saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = None, False
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _check_size(size: tuple[int, int], max_pixels: int | None, name: str) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageReadError(f"{name}: the image is empty ({w}x{h} pixels)")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageReadError(
            f"{name}: the image is {w}x{h} = {w * h:,} pixels, more than the limit "
            f"of {max_pixels:,}; pass --max-pixels N to allow larger images"
        )


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def read_image(path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Picture:
    """Read an image file into a Picture; every failure is a one-line ImageReadError."""
    return _read(path, max_pixels, _picture)


def read_rgb8(path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """(3, H, W) uint8 RGB of an image file, orientation applied and alpha dropped: the pixels read_image gives,
    without a float copy of the whole photo (training reads many big ones). 16-bit files are rounded to 8 bit."""
    return _read(path, max_pixels, _rgb8)


def _read(path, max_pixels: int | None, convert):
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise ImageReadError(f"{path} is a folder, not an image file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: the file is empty (0 bytes)")
    with _pil_guard():
        try:
            with Image.open(path) as img:
                _check_size(img.size, max_pixels, str(path))
                return convert(img, _read_deep(img, path), str(path))
        except ImageReadError:
            raise
        except UnidentifiedImageError as e:
            raise ImageReadError(f"{path}: {_unidentified(path)}") from e
        except PermissionError as e:
            raise ImageReadError(f"{path}: permission denied") from e
        except Exception as e:  # Pillow and the codecs raise many types on bad data
            raise ImageReadError(
                f"{path}: cannot decode the image, the file is corrupt or truncated ({_reason(e)})"
            ) from e


_SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF8": "GIF",
    b"II*\0": "TIFF",
    b"MM\0*": "TIFF",
    b"BM": "BMP",
}


def _unidentified(path: Path) -> str:
    """Why Pillow refused a file: its own message ("cannot identify") does not say."""
    with open(path, "rb") as f:
        head = f.read(32)
    if head.startswith(b"\x89PNG") and head[12:16] == b"IHDR":
        w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        if w == 0 or h == 0:
            return f"the image is empty ({w}x{h} pixels)"
    kind = next((k for sig, k in _SIGNATURES.items() if head.startswith(sig)), None)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        kind = "WebP"
    if kind:
        return f"looks like a {kind} file but its header is corrupt"
    return "not an image, or a format Pillow cannot read (use JPEG, PNG, WebP, TIFF, BMP or GIF)"


def from_pil(img: Image.Image, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Picture:
    """Same conversions as read_image for an image already opened with Pillow."""
    name = getattr(img, "filename", "") or "image"
    _check_size(img.size, max_pixels, name)
    with _pil_guard():
        try:
            return _picture(img, None, name)
        except ImageReadError:
            raise
        except Exception as e:
            raise ImageReadError(f"{name}: cannot decode the image ({_reason(e)})") from e


def _read_deep(img: Image.Image, path: Path) -> np.ndarray | None:
    """(H, W, C) uint16 pixels for 16-bit PNG/TIFF, which Pillow would cut to 8 bit; else None."""
    if img.format == "PNG":
        with open(path, "rb") as f:
            head = f.read(26)
        if head[12:16] != b"IHDR" or head[24] != 16:
            return None
        return _channels_last(imagecodecs.png_decode(path.read_bytes()))
    if img.format == "TIFF":
        tags = img.tag_v2
        bits, sample_fmt = _tuple(tags.get(258, 8)), _tuple(tags.get(339, 1))
        if set(bits) != {16} or set(sample_fmt) != {1} or tags.get(262) not in (1, 2):
            return None  # 8-bit, signed/float or exotic colour spaces: Pillow's way
        with tifffile.TiffFile(path) as tf:
            page = tf.pages[0]
            arr = page.asarray()
            if page.planarconfig == 2 and arr.ndim == 3:  # separate planes: (S, H, W)
                arr = np.moveaxis(arr, 0, -1)
        arr = _channels_last(arr.astype(np.uint16, copy=False))
        if arr.shape[-1] > 4:
            arr = arr[..., :3]  # unknown extra samples: keep the colour only
        if _tuple(tags.get(338, 0))[0] == 1 and arr.shape[-1] in (2, 4):
            arr = _unpremultiply(arr)
        return arr
    return None


def _tuple(v) -> tuple:
    return v if isinstance(v, tuple) else (v,)


def _channels_last(arr: np.ndarray) -> np.ndarray:
    return arr[..., None] if arr.ndim == 2 else arr


def _unpremultiply(arr: np.ndarray) -> np.ndarray:
    """Associated (premultiplied) alpha -> straight alpha, as every other source has."""
    a = arr[..., -1:].astype(np.float64)
    color = np.where(a > 0, arr[..., :-1] * 65535.0 / np.maximum(a, 1), 0)
    return np.concatenate([np.clip(np.rint(color), 0, 65535), a], -1).astype(np.uint16)


def _decode(img: Image.Image, deep: np.ndarray | None, name: str) -> tuple[np.ndarray, bytes | None, bytes | None]:
    """(upright (H, W, C) uint8/uint16 pixels, ICC profile, EXIF with the orientation reset)."""
    if getattr(img, "is_animated", False) and img.format != "MPO":  # MPO: phone JPEG + extras
        warnings.warn(
            f"{name} is animated or has several frames: only the first frame is upscaled", stacklevel=5
        )  # read_image's caller
        img.seek(0)
    if deep is None:
        img.load()  # decode here, inside the caller's try: a cut file must fail now
        arr, icc = _pil_pixels(img, name)
    else:
        arr, icc = deep, img.info.get("icc_profile") or None
    # After load: Pillow rotates TIFFs itself while loading and then drops their tag.
    exif, orientation = _exif(img, name)
    return _orient(arr, orientation), icc, exif


def _rgb8(img: Image.Image, deep: np.ndarray | None, name: str) -> torch.Tensor:
    arr = _decode(img, deep, name)[0]
    arr = arr[..., :-1] if arr.shape[-1] in (2, 4) else arr
    if arr.dtype == np.uint16:
        arr = np.rint(arr / 257.0).astype(np.uint8)  # v * 255 / 65535, as read_image's floats would round
    arr = np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr
    return torch.from_numpy(np.require(arr, requirements=["C", "W"])).permute(2, 0, 1)  # a copy only if needed


def _picture(img: Image.Image, deep: np.ndarray | None, name: str) -> Picture:
    arr, icc, exif = _decode(img, deep, name)
    bits = 16 if arr.dtype == np.uint16 else 8
    x = torch.from_numpy(arr.astype(np.float32) / (65535.0 if bits == 16 else 255.0)).permute(2, 0, 1)
    color = x[:-1] if x.shape[0] in (2, 4) else x
    return Picture(
        rgb=color.expand(3, -1, -1).contiguous() if color.shape[0] == 1 else color.contiguous(),
        alpha=x[-1:].contiguous() if x.shape[0] in (2, 4) else None,
        gray=color.shape[0] == 1,
        bits=bits,
        icc_profile=icc,
        exif=exif,
        format=img.format,
    )


def _pil_pixels(img: Image.Image, name: str) -> tuple[np.ndarray, bytes | None]:
    """Pillow image -> (H, W, C) uint8/uint16 array with C in 1 (L), 2 (LA), 3 (RGB), 4 (RGBA)."""
    icc = img.info.get("icc_profile") or None
    mode, has_trns = img.mode, "transparency" in img.info
    if mode == "CMYK":
        img, icc = _cmyk_to_rgb(img, icc, name)
    elif mode in ("P", "PA"):
        img = img.convert("RGBA" if mode == "PA" or has_trns else "RGB")
    elif mode in ("L", "RGB") and has_trns:  # a tRNS colour key is alpha in disguise
        img = img.convert(mode[0] + "A" if mode == "L" else "RGBA")
    elif mode in ("1", "F"):
        img = img.convert("L")
    elif mode in ("La", "RGBa"):
        img = img.convert(mode[:-1] + "A")
    elif not (mode in ("L", "LA", "RGB", "RGBA", "I") or mode.startswith("I;16")):
        img = img.convert("RGBA" if "A" in img.getbands() else "RGB")  # YCbCr, LAB, HSV, RGBX...
    arr = np.asarray(img)
    if img.mode == "I" or img.mode.startswith("I;16"):  # 16-bit grayscale (I: older Pillow's PNG)
        arr = np.clip(arr, 0, 65535).astype(np.uint16)
    return _channels_last(arr), icc


def _cmyk_to_rgb(img: Image.Image, icc: bytes | None, name: str) -> tuple[Image.Image, bytes | None]:
    """Use the file's CMYK profile when it has one: printers' CMYK is far from naive 1 - C."""
    if icc is not None:
        try:
            srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
            out = ImageCms.profileToProfile(img, ImageCms.ImageCmsProfile(io.BytesIO(icc)), srgb, outputMode="RGB")
            return out, srgb.tobytes()
        except (ImageCms.PyCMSError, OSError, ValueError) as e:
            warnings.warn(
                f"{name}: its CMYK colour profile is unusable ({_reason(e)}); converting CMYK to RGB without it",
                stacklevel=7,
            )
    return img.convert("RGB"), None


def _exif(img: Image.Image, name: str) -> tuple[bytes | None, int]:
    """(EXIF bytes with Orientation reset to 1, the source orientation)."""
    try:
        exif = img.getexif()
        orientation = exif.get(ORIENTATION, 1)
        if img.format == "TIFF":
            for tag in _TIFF_LAYOUT_TAGS:
                exif.pop(tag, None)
        if ORIENTATION in exif:
            exif[ORIENTATION] = 1
        data = exif.tobytes() if len(exif) else None
    except Exception as e:  # broken EXIF must not cost the user the picture
        warnings.warn(f"{name}: unreadable EXIF metadata is dropped ({_reason(e)})", stacklevel=6)
        return None, 1
    return data, orientation if orientation in range(1, 9) else 1


def _orient(a: np.ndarray, orientation: int) -> np.ndarray:
    """Apply EXIF orientation (1..8) to an (H, W, C) array, as ImageOps.exif_transpose does."""
    ops = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],
        8: lambda a: np.rot90(a, 1),
    }
    return np.ascontiguousarray(ops[orientation](a)) if orientation in ops else a


def find_images(folder, pattern: str = "*", recursive: bool = False, exclude=None) -> list[Path]:
    """The image files (IMAGE_SUFFIXES, any case) in `folder` matching `pattern`, sorted; hidden files
    (".name", e.g. our own temp files) and anything under `exclude` (e.g. the output folder) are left out.
    An empty list when there are none; callers say what that means for them."""
    folder = Path(folder)
    files = folder.rglob(pattern) if recursive else folder.glob(pattern)
    skip = Path(exclude).resolve() if exclude is not None else None
    return sorted(
        p
        for p in files
        if p.suffix.lower() in IMAGE_SUFFIXES
        and not p.name.startswith(".")
        and p.is_file()
        and (skip is None or skip not in p.resolve().parents)
    )


def image_files(folder, what: str, error: type[Exception] = ImageReadError) -> list[Path]:
    """find_images(folder) where the folder must exist and hold images; else one line `error` naming `what`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise error(f"{what} {folder} " + ("is a file, not a folder" if folder.exists() else "does not exist"))
    if not (files := find_images(folder)):
        raise error(f"{what} {folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


# ---------------------------------------------------------------- tensors


def upscale_alpha(alpha: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(1, h, w) -> (1, H, W) with Lanczos on a float image (no 8-bit rounding), size=(H, W)."""
    h, w = size
    src = Image.fromarray(alpha.detach().float().cpu()[0].numpy())  # mode "F"
    out = np.asarray(src.resize((w, h), Image.Resampling.LANCZOS))
    return torch.from_numpy(np.clip(out, 0.0, 1.0).copy())[None]  # Lanczos overshoots at edges


def replace_pixels(pic: Picture, rgb: torch.Tensor) -> Picture:
    """A Picture with new (e.g. upscaled) pixels: alpha resized to match, metadata kept."""
    if rgb.ndim != 3 or rgb.shape[0] != 3:
        raise ValueError(f"rgb must be (3, H, W), got {tuple(rgb.shape)}")
    size = tuple(rgb.shape[-2:])
    alpha = pic.alpha
    if alpha is not None and tuple(alpha.shape[-2:]) != size:
        alpha = upscale_alpha(alpha, size)
    # The model may overshoot [0, 1]; a Picture always holds displayable values.
    return replace(pic, rgb=rgb.detach().float().clamp(0, 1), alpha=alpha)


def _pixels(pic: Picture, gray: bool, alpha: bool, bits: int) -> np.ndarray:
    """Picture -> (H, W, C) uint8/uint16 array with the requested layout."""
    rgb = pic.rgb.detach().float().cpu().clamp(0, 1)
    chans = [sum(w * c for w, c in zip(_LUMA, rgb))[None] if gray else rgb]
    if alpha:
        chans.append(pic.alpha.detach().float().cpu().clamp(0, 1))
    scale, dtype = (65535.0, np.uint16) if bits == 16 else (255.0, np.uint8)
    x = torch.cat(chans).permute(1, 2, 0).numpy()
    return np.ascontiguousarray(np.rint(x * scale).astype(dtype))


def _icc_for(icc: bytes | None, gray: bool) -> bytes | None:
    """A grayscale profile on RGB pixels (or the reverse) is invalid: drop it then."""
    if icc is None or len(icc) < 20:
        return None
    space = icc[16:20]
    return icc if space == (b"GRAY" if gray else b"RGB ") else None


def _pil_image(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


def to_pil(pic: Picture) -> Image.Image:
    """Inverse of from_pil. Pillow has no 16-bit colour or 16-bit LA mode: those become 8-bit."""
    alpha = pic.alpha is not None
    bits = 16 if pic.bits == 16 and pic.gray and not alpha else 8  # only I;16 exists
    img = _pil_image(_pixels(pic, pic.gray, alpha, bits))
    if (icc := _icc_for(pic.icc_profile, pic.gray)) is not None:
        img.info["icc_profile"] = icc
    if pic.exif is not None:
        img.info["exif"] = pic.exif
    return img


# ---------------------------------------------------------------- writing


def output_format(path, fmt: str | None = None) -> str:
    """Pillow format name from an explicit format ("jpg", "PNG", ...) or the path's suffix."""
    key = "." + fmt.lower().lstrip(".") if fmt else Path(path).suffix.lower()
    if key not in SUFFIX_FORMATS:
        what = f"format {fmt!r}" if fmt else f"suffix {Path(path).suffix or '(none)'!r} of {path}"
        raise ImageWriteError(f"unknown output {what}; use one of: {', '.join(SUFFIX_FORMATS)}")
    return SUFFIX_FORMATS[key]


def write_image(pic: Picture, path, fmt: str | None = None, quality: int = 95, overwrite: bool = True) -> Path:
    """Write atomically (see atomic_path; the bytes are on disk first) and return the path."""
    path = Path(path)
    fmt = output_format(path, fmt)
    folder = path.parent
    if not folder.is_dir():
        raise ImageWriteError(f"cannot write {path}: the folder {folder} does not exist")
    if path.is_dir():
        raise ImageWriteError(f"cannot write {path}: it is a folder")
    if path.exists() and not overwrite:
        raise ImageWriteError(f"{path} already exists; allow overwriting or choose another name")
    try:
        with atomic_path(path) as tmp:
            try:
                f = open(tmp, "xb")  # exclusive create, mode 0o666 minus umask like any new file
            except OSError as e:
                raise ImageWriteError(f"cannot write to the folder {folder} ({_reason(e)})") from e
            with f:
                _encode(pic, f, fmt, quality, path.name)
                f.flush()
                os.fsync(f.fileno())  # the bytes are on disk before the name points at them
    except ImageWriteError:
        raise
    except Exception as e:
        raise ImageWriteError(f"cannot write {path} ({_reason(e)})") from e
    return path


@contextmanager
def atomic_path(path) -> Iterator[Path]:
    """A temporary name beside `path` (same suffix, so writers that go by it pick the right format) that
    becomes `path` when the block ends, and is removed if the block fails: a reader (or a resumed run) sees the
    old file or the new one, never half of one. A folder written this way replaces an existing folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            shutil.rmtree(path)  # os.replace cannot put a folder over a folder that holds files
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _encode(pic: Picture, f, fmt: str, quality: int, name: str) -> None:
    alpha = pic.alpha is not None
    if alpha and fmt == "JPEG":
        warnings.warn(
            f"{name}: JPEG cannot store transparency; the alpha channel is dropped "
            "(write PNG, WebP or TIFF to keep it)",
            stacklevel=4,
        )
        alpha = False
    # WebP has no grayscale; BMP has no gray+alpha.
    gray = pic.gray and fmt != "WEBP" and not (fmt == "BMP" and alpha)
    bits = 16 if pic.bits == 16 and fmt in ("PNG", "TIFF") else 8
    arr = _pixels(pic, gray, alpha, bits)
    icc = _icc_for(pic.icc_profile, gray) if fmt != "BMP" else None
    exif = pic.exif if fmt != "BMP" else None
    if bits == 16 and fmt == "PNG":
        f.write(_png16(arr, icc, exif))
    elif bits == 16:
        _tiff16(arr, f, icc, exif, name)
    else:
        opts = {"icc_profile": icc, "exif": exif}
        if fmt in ("JPEG", "WEBP"):
            opts["quality"] = quality
        if fmt == "JPEG" and quality >= 90:
            opts["subsampling"] = 0  # 4:2:0 chroma would blur away the detail we just made
        _pil_image(arr).save(f, format=fmt, **{k: v for k, v in opts.items() if v is not None})


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")


def _png16(arr: np.ndarray, icc: bytes | None, exif: bytes | None) -> bytes:
    """16-bit PNG via libpng, with iCCP/eXIf chunks inserted right after IHDR."""
    png = imagecodecs.png_encode(arr[..., 0] if arr.shape[-1] == 1 else arr, level=6)
    extra = b""
    if icc is not None:
        extra += _png_chunk(b"iCCP", b"ICC Profile\0\0" + zlib.compress(icc))
    if exif is not None:
        extra += _png_chunk(b"eXIf", exif[6:] if exif.startswith(b"Exif\0\0") else exif)
    ihdr_end = 8 + 4 + 4 + 13 + 4  # signature + IHDR (length, type, 13 data bytes, CRC)
    return png[:ihdr_end] + extra + png[ihdr_end:]


def _tiff16(arr: np.ndarray, f, icc: bytes | None, exif: bytes | None, name: str) -> None:
    if exif is not None:
        warnings.warn(
            f"{name}: EXIF metadata is not written to 16-bit TIFF files (the ICC profile is kept)", stacklevel=5
        )
    gray, channels = arr.shape[-1] <= 2, arr.shape[-1]
    tifffile.imwrite(
        f,
        arr[..., 0] if channels == 1 else arr,
        photometric="minisblack" if gray else "rgb",
        planarconfig="contig" if channels > 1 else None,
        extrasamples=["unassalpha"] if channels in (2, 4) else None,
        iccprofile=icc,
        compression="zlib",
        metadata=None,
    )

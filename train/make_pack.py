"""The training-photo pack for a GPU burst: the CPU recipe's training photos, as many and as good as fit beside the
tree in a device call's 64 MiB payload. The pack is an ignored folder named in the call's `carry`, never committed.

Source: the output of train/prepare_photos.py (data/photos/train by default; the held-out validation photos are
not in it). Encoding, chosen by measurement: lossless PNG if the whole set fits, else the highest JPEG quality
(4:4:4, no chroma subsampling) from 98 down to 90 that fits; below 90 JPEG's blocking would become part of the
"HQ" target, so if q90 still does not fit, every photo keeps a centred crop of a smaller area instead.
manifest.json records each candidate's size and PSNR against the source.

    python train/prepare_photos.py --out data/photos     # once (needs `apt-get download`)
    python train/make_pack.py                             # -> packs/gpu/ (budget: 64 MiB - the tree - 1 MiB)
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import payload  # noqa: E402  (train/ is scripts, not a package)

QUALITIES = (98, 97, 95, 93, 90)
MIN_QUALITY = QUALITIES[-1]
MARGIN = 2**20  # room for files that appear between packing and the call (notes, a log)
SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")


def encode(img: Image.Image, quality: int | None) -> bytes:
    buf = io.BytesIO()
    if quality is None:
        img.save(buf, "PNG", optimize=False, compress_level=6)
    else:
        img.save(buf, "JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def psnr(a: Image.Image, data: bytes) -> float:
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)


def centre_crop(img: Image.Image, area: float, min_side: int) -> Image.Image:
    """The centred part of `img` with `area` of its pixels (same aspect), no side under min_side."""
    f = math.sqrt(area)
    w, h = max(min(img.width, min_side), round(img.width * f)), max(min(img.height, min_side), round(img.height * f))
    x, y = (img.width - w) // 2, (img.height - h) // 2
    return img.crop((x, y, x + w, y + h))


def plan(photos: dict[str, Image.Image], budget: int, min_side: int = 256) -> tuple[dict, list[dict]]:
    """(name -> encoded bytes, measurements): the best encoding that fits `budget` bytes."""
    tried = []
    for q in (None, *QUALITIES):
        enc = {n: encode(im, q) for n, im in photos.items()}
        size = sum(map(len, enc.values()))
        mean_psnr = None if q is None else float(np.mean([psnr(photos[n], b) for n, b in enc.items()]))
        tried.append({"format": "png" if q is None else f"jpeg-q{q}", "bytes": size, "psnr_db": mean_psnr})
        if size <= budget:
            return enc, tried
    area = budget / size
    while True:  # q90 is too big: smaller centred crops, shrunk until the pack fits
        area *= 0.97
        crops = {n: centre_crop(im, area, min_side) for n, im in photos.items()}
        enc = {n: encode(im, MIN_QUALITY) for n, im in crops.items()}
        size = sum(map(len, enc.values()))
        tried.append({"format": f"jpeg-q{MIN_QUALITY}", "area": round(area, 3), "bytes": size})
        if size <= budget:
            return enc, tried
        if area < 0.02:
            raise SystemExit(f"make_pack: even small crops need {size} bytes, over the budget of {budget}")


def skimage_photos() -> dict[str, Image.Image]:
    import skimage.data
    from prepare_photos import SKIMAGE, VAL

    out = {}
    for name in SKIMAGE:
        if name not in VAL:
            arr = getattr(skimage.data, name)()
            out[name] = Image.fromarray(arr[0] if isinstance(arr, tuple) else arr).convert("RGB")
    return out


def _ignored(path: Path) -> bool:
    r = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=payload.ROOT, capture_output=True)
    return r.returncode == 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--src",
        default="data/photos/train",
        help="training photos (train/prepare_photos.py's train/), or 'skimage': its sample photos alone",
    )
    ap.add_argument("--out", default="packs/gpu", help="pack folder (must be git-ignored)")
    ap.add_argument(
        "--budget",
        type=int,
        default=None,
        help="bytes for the pack (default: 64 MiB - what the tree and the other carries send - 1 MiB)",
    )
    ap.add_argument("--carry", nargs="*", default=[], help="other carried paths that share the payload")
    args = ap.parse_args(argv)
    src, out = Path(args.src), Path(args.out)
    files = sorted(f for f in src.rglob("*") if f.suffix.lower() in SUFFIXES) if src.is_dir() else []
    if args.src == "skimage":  # no apt-get needed: a small pack for CPU rehearsals (gpu_burst.sh --dry-run)
        photos = skimage_photos()
    elif files:
        photos = {f.stem: Image.open(f).convert("RGB") for f in files}
    else:
        raise SystemExit(f"make_pack: no photos in {src}; run `python train/prepare_photos.py --out data/photos` first")
    if args.budget is None:
        if not _ignored(out.resolve()):
            raise SystemExit(f"make_pack: {out} is not git-ignored; the pack must travel by `carry`, not in the tree")
        rel = [c for c in args.carry if Path(c) != out]
        used = payload.measure(rel)["total_bytes"]
        budget = payload.LIMIT - used - MARGIN
        if budget <= 0:
            raise SystemExit(f"make_pack: the tree already sends {used / 2**20:.1f} MiB; no room for a pack")
    else:
        budget = args.budget
    enc, tried = plan(photos, budget)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ext = ".png" if tried[-1]["format"] == "png" else ".jpg"
    for name, data in enc.items():
        (tmp / f"{name}{ext}").write_bytes(data)
    manifest = {"source": str(src), "photos": len(enc), "budget_bytes": budget, "chosen": tried[-1], "tried": tried}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    c = tried[-1]
    print(
        f"{out}: {len(enc)} photos, {c['format']}{' area ' + str(c['area']) if 'area' in c else ''}, "
        f"{c['bytes'] / 2**20:.1f} MiB of a {budget / 2**20:.1f} MiB budget"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

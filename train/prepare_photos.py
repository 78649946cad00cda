"""Build the offline training/validation photo set used for the embedded model.

Sources (all offline, see ../shared/ENVIRONMENT.md): scikit-image's sample photos, and the Debian packages
lomiri-wallpapers-16.04 (CC-BY/CC-BY-SA), the two photos of lomiri-wallpapers-20.04 (CC-BY-SA-3.0; its
other two are abstract), mate-backgrounds nature/ (GPL-2+), the eleven photos of lxqt-themes' wallpapers
(CC-BY-SA-3.0 per its wallpapers/License, LGPL-2.1+ per debian/copyright; the rest are logos and abstract),
opencv-doc samples and matplotlib's grace_hopper portrait (public domain; the one close-up face, for skin), fetched
with `apt-get download` and unpacked with `dpkg -x` (no install needed). Checked, no photos: gnome-backgrounds,
lomiri-wallpapers, ukui-wallpapers, sway-backgrounds, desktop-base, xfdesktop4-data, mypaint-data-extras.

JPEG sources are downscaled by at least 2 (Lanczos) so their compression artefacts do not become the
"HQ" target; the longest side is capped so a crop still shows a meaningful part of a scene.
A fixed list of photos is held out for validation and never trained on.

    python train/prepare_photos.py --out data/photos        # -> data/photos/{train,val}/*.png, val_hr/*.png
    python train/prepare_photos.py --from ~/Pictures --out data/mine   # any folder of photos instead (no apt)

The Debian packages need `apt-get download` (a Debian or Ubuntu machine with its package lists, no root);
`--from DIR` takes every photo under DIR instead and holds out every `--val-every`-th one (sorted by path).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib.cbook
import numpy as np
from PIL import Image

DEBS = ["lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04", "mate-backgrounds", "opencv-doc", "lxqt-themes"]
ABSTRACT = {"Fossa_by_Jasper_Roks", "Painting-Colors_by__herobrine7gamer"}  # lomiri-wallpapers-20.04's non-photos
LXQT_PHOTOS = [  # lxqt-themes' photos, named lxqt_<stem> (opencv-doc has a butterfly too)
    "after-the-rain.jpg",
    "appleflower.png",
    "beam.png",
    "butterfly.png",
    "Butterfly-Kenneth-Wimer.jpg",
    "cloud.png",
    "drop.png",
    "flowers.png",
    "fog.jpg",
    "this-is-not-windows.jpg",
    "Valendas.png",
]
OPENCV_PHOTOS = [
    "baboon.jpg",
    "leuvenA.jpg",
    "leuvenB.jpg",
    "aloeL.jpg",
    "board.jpg",
    "graf1.png",
    "graf3.png",
    "rubberwhale1.png",
    "ela_original.jpg",
    "fruits.jpg",
    "building.jpg",
    "home.jpg",
    "pic1.png",
    "pic2.png",
    "pic3.png",
    "pic4.png",
    "pic5.png",
    "pic6.png",
    "stuff.jpg",
    "orange.jpg",
    "apple.jpg",
    "HappyFish.jpg",
    "butterfly.jpg",
    "messi5.jpg",
    "Blender_Suzanne1.jpg",
]
SKIMAGE = [
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "stereo_motorcycle",
    "hubble_deep_field",
    "grass",
    "gravel",
    "brick",
]
# held out: never trained on; 512x512 HR crops of these are the validation set
VAL = {"Dragonfly_by_Bolly", "sunset_by_Aitzol_Berasategi", "LadyBird", "Storm", "leuvenB", "coffee"}
MAX_SIDE = 1280


def fetch_debs(work: Path) -> Path:
    root = work / "root"
    for name in DEBS:
        try:
            subprocess.run(["apt-get", "download", name], cwd=work, check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as e:
            err = getattr(e, "stderr", None)
            why = err.decode(errors="replace").strip().splitlines()[-1:] if err else [str(e)]
            sys.exit(
                f"error: `apt-get download {name}` failed ({' '.join(why)}); this needs a Debian/Ubuntu "
                "machine with its package lists, or use --from DIR with your own photos"
            )
    for deb in work.glob("*.deb"):
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    return root


def sources(root: Path):
    bg = root / "usr/share/backgrounds"
    for f in sorted(bg.glob("*.jpg")):  # lomiri wallpapers (photos)
        if f.stem not in ABSTRACT:
            yield f.stem, Image.open(f), True
    for f in sorted((bg / "mate/nature").glob("*.jpg")):
        yield f.stem, Image.open(f), True
    for name in LXQT_PHOTOS:  # PNGs too are treated as JPEGs: camera photos, downscaled by at least 2 all the same
        yield f"lxqt_{Path(name).stem}", Image.open(root / "usr/share/lxqt/wallpapers" / name), True
    data = root / "usr/share/doc/opencv-doc/examples/data"
    for name in OPENCV_PHOTOS:
        if (data / name).exists():
            yield Path(name).stem, Image.open(data / name), name.endswith(".jpg")
    yield "grace_hopper", Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")), True
    import skimage.data

    for name in SKIMAGE:
        arr = getattr(skimage.data, name)()
        yield name, Image.fromarray(arr[0] if isinstance(arr, tuple) else arr), False  # stereo: left view


def folder_sources(folder: Path, val_every: int):
    """(name, image, is_jpeg, held out) for every photo under `folder`, EXIF orientation applied."""
    from teasr_cli.imageio import find_images, read_image, to_pil

    files = find_images(folder, "*", recursive=True)
    if not files:
        sys.exit(f"error: no photos (JPEG, PNG, WebP, TIFF, BMP) under {folder}")
    for i, f in enumerate(files):
        name = "_".join(f.relative_to(folder).with_suffix("").parts)
        yield name, to_pil(read_image(f)), f.suffix.lower() in (".jpg", ".jpeg"), i % val_every == val_every - 1


def prepare(img: Image.Image, jpeg: bool) -> Image.Image:
    img = img.convert("RGB")
    f = max(2 if jpeg else 1, max(img.size) / MAX_SIDE)
    if f > 1:
        img = img.resize((round(img.width / f), round(img.height / f)), Image.LANCZOS)
    return img


def center_crops(img: Image.Image, size: int = 512, n: int = 2):
    """n crops along the longer side (left/right or top/bottom of centre), size x size."""
    w, h = img.size
    if min(w, h) < size:
        return []
    xs = np.linspace(0, w - size, n + 2)[1:-1] if w >= h else [(w - size) / 2] * n
    ys = np.linspace(0, h - size, n + 2)[1:-1] if h > w else [(h - size) / 2] * n
    return [img.crop((int(x), int(y), int(x) + size, int(y) + size)) for x, y in zip(xs, ys)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="data/photos")
    ap.add_argument("--from", dest="src", type=Path, help="any folder of photos instead of the Debian packages")
    ap.add_argument("--val-every", type=int, default=8, help="with --from: hold out every N-th photo")
    args = ap.parse_args()
    out = Path(args.out)
    for sub in ("train", "val", "val_hr"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        if args.src:
            photos = folder_sources(args.src, args.val_every)
        else:
            photos = ((name, img, jpeg, name in VAL) for name, img, jpeg in sources(fetch_debs(Path(work))))
        n_train = n_val = 0
        for name, img, jpeg, held_out in photos:
            img = prepare(img, jpeg)
            if held_out:
                img.save(out / "val" / f"{name}.png")
                for i, c in enumerate(center_crops(img)):
                    c.save(out / "val_hr" / f"{name}_{i}.png")
                    n_val += 1
            else:
                img.save(out / "train" / f"{name}.png")
                n_train += 1
    print(f"{n_train} training photos, {n_val} validation crops (512x512) in {out}")


if __name__ == "__main__":
    main()

"""Benchmark pairs for `teasr eval`: the public StableSR test sets, local LQ/HQ folders, or
LQ made on the fly from HQ photos with a fixed, per-image seeded degradation.

A pair is loaded only when it is evaluated, so a test set of thousands of images never sits in
memory; its names and sizes are checked first, from the file headers, so a bad folder fails in
seconds with a message naming the offending files instead of after an hour of sampling.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import silent_tqdm
from PIL import Image, UnidentifiedImageError

from .degrade import LR_KINDS, PRESETS, make_lq
from .errors import TeasrError
from .imageio import image_files, read_image

SCALE = 4
SHOW = 5  # offenders listed in an error message; the rest are counted

REPO_ID = "Iceclear/StableSR-TestSets"
ZIP_NAME = "StableSR_testsets.zip"
# Not yet a commit: the Hub cannot be reached from where this was written, and no public code, issue
# or page we could search records a commit of this repo, so the branch is used. Replace it with
# `huggingface_hub.HfApi().dataset_info(REPO_ID).sha` (then a cached zip needs no request at all, and
# results stay comparable even if the authors re-upload the zip); eval JSONs record this value.
REVISION = "main"


class DatasetError(TeasrError):
    """A benchmark set cannot be found, downloaded, extracted or paired."""


@dataclass(frozen=True)
class NamedSet:
    folder: str  # folder inside the zip (under its top-level StableSR_testsets/)
    lq: str
    hq: str
    about: str


NAMED: dict[str, NamedSet] = {
    "realsr": NamedSet(
        "RealSRVal_crop128", "test_LR", "test_HR", "RealSR (Canon/Nikon), 100 real LR/HR crops, 128 -> 512"
    ),
    "drealsr": NamedSet("DrealSRVal_crop128", "test_LR", "test_HR", "DRealSR, 93 real LR/HR crops, 128 -> 512"),
    "div2k-val": NamedSet(
        "DIV2K_V2_val", "lq", "gt", "DIV2K validation crops with Real-ESRGAN degradation, 128 -> 512"
    ),
}


@dataclass(frozen=True)
class Pair:
    """One benchmark item. `lq` None: the LQ is made from `hq` by `degrade` ("bicubic" or a
    degrade.py preset) with a generator seeded from (`seed`, `index`), so it is the same every run."""

    name: str
    lq: Path | None
    hq: Path
    degrade: str | None = None
    seed: int = 0
    index: int = 0

    def load(self, scale: int = SCALE) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (lq (1, 3, h, w), hq (1, 3, scale*h, scale*w)), RGB in [0, 1]."""
        hq = read_image(self.hq).rgb[None]
        if self.lq is None:
            return synth_lq(hq, self.degrade or "bicubic", self.seed, self.index, scale)
        lq = read_image(self.lq).rgb[None]
        (h, w), (H, W) = lq.shape[-2:], hq.shape[-2:]
        if (H, W) != (scale * h, scale * w):
            raise DatasetError(
                f"pair '{self.name}': HQ {self.hq.name} is {W}x{H} but LQ {self.lq.name} is {w}x{h}; "
                f"HQ must be exactly {scale}x the LQ ({scale * w}x{scale * h})"
            )
        return lq, hq


# ------------------------------------------------------------------ synthetic LQ


def pair_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed per (run seed, image index): neighbouring images and seeds get
    unrelated degradations, and --limit N keeps the first N images' LQ unchanged."""
    return int(np.random.SeedSequence([seed, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def synth_lq(
    hq: torch.Tensor, how: str, seed: int, index: int, scale: int = SCALE
) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 3, H, W) HQ -> (lq, hq cropped to a multiple of `scale`); LQ rounded to 8 bits like a real file.
    `how`: "bicubic" (plain antialiased downscale) or a degrade.py preset name."""
    H, W = (hq.shape[-2] // scale) * scale, (hq.shape[-1] // scale) * scale
    if H == 0 or W == 0:
        raise DatasetError(f"HQ image of {hq.shape[-1]}x{hq.shape[-2]} is smaller than the scale {scale}")
    hq = hq[..., :H, :W].contiguous()
    lq = make_lq(hq, how, torch.Generator().manual_seed(pair_seed(seed, index)), scale)
    return (lq.clamp(0, 1) * 255).round() / 255, hq


def check_degrade(name: str) -> str:
    if name not in LR_KINDS:
        raise DatasetError(f"unknown --degrade {name!r}; use bicubic or one of: {', '.join(PRESETS)}")
    return name


# ------------------------------------------------------------------ folders

# Trailing tokens benchmark sets put on one side only: Canon_003_LR4 / Canon_003_HR, 0801x4 / 0801, img_lq / img_gt.
_TOKEN = re.compile(r"(?:[_\-. ]?(?:lr|hr|lq|gt|sr)\d*|[_\-. ]?x\d+)$", re.IGNORECASE)


def strip_tokens(stem: str) -> str:
    """`stem` without the LR/HR tokens at its end (the stem itself if nothing else would be left)."""
    while (m := _TOKEN.search(stem)) and m.start() > 0:
        stem = stem[: m.start()]
    return stem


def match_key(stem: str) -> str:
    return strip_tokens(stem).lower()


def _names(paths: list[Path]) -> str:
    shown = ", ".join(p.name for p in paths[:SHOW])
    return shown + (f" and {len(paths) - SHOW} more" if len(paths) > SHOW else "")


def _by_key(files: list[Path], role: str, folder: Path, keyfn=match_key) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in files:
        key = keyfn(p.stem)
        if key in out:
            raise DatasetError(
                f"{role} folder {folder}: {out[key].name} and {p.name} name the same image; keep one file per image"
            )
        out[key] = p
    return out


def pair_folders(lq_dir, hq_dir) -> list[Pair]:
    """Match LQ and HQ files by name (exact stem first, then with LR/HR tokens dropped)."""
    lq_dir, hq_dir = Path(lq_dir), Path(hq_dir)
    lqs, hqs = image_files(lq_dir, "LQ folder", DatasetError), image_files(hq_dir, "HQ folder", DatasetError)
    _by_key(lqs, "LQ", lq_dir, keyfn=str)  # a.png beside a.jpg: refuse rather than pick one
    hq_by_stem = _by_key(hqs, "HQ", hq_dir, keyfn=str)
    pairs = {p: hq_by_stem[p.stem] for p in lqs if p.stem in hq_by_stem}
    rest_lq = [p for p in lqs if p not in pairs]
    rest_hq = [p for p in hqs if p not in set(pairs.values())]
    hq_by_key = _by_key(rest_hq, "HQ", hq_dir)
    for p in rest_lq:
        if (hq := hq_by_key.pop(match_key(p.stem), None)) is not None:
            pairs[p] = hq
    no_hq = [p for p in lqs if p not in pairs]
    no_lq = sorted(hq_by_key.values())
    if no_hq or no_lq:
        parts = ([f"{len(no_hq)} LQ image(s) without an HQ partner in {hq_dir}: {_names(no_hq)}"] if no_hq else []) + (
            [f"{len(no_lq)} HQ image(s) without an LQ partner in {lq_dir}: {_names(no_lq)}"] if no_lq else []
        )
        raise DatasetError(
            "LQ and HQ names do not match: " + "; ".join(parts) + " (names must be equal up to LR/HR tokens)"
        )
    return [Pair(lq.stem if lq.stem == hq.stem else strip_tokens(hq.stem), lq, hq) for lq, hq in sorted(pairs.items())]


def synthetic_pairs(hq_dir, degrade: str, seed: int = 0) -> list[Pair]:
    """HQ photos whose LQ is made on the fly (see Pair)."""
    check_degrade(degrade)
    hqs = image_files(hq_dir, "HQ folder", DatasetError)
    return [Pair(p.stem, None, p, degrade, seed, i) for i, p in enumerate(hqs)]


def _header_size(path: Path) -> tuple[int, int]:
    """(W, H) as read_image will see it (EXIF rotations by 90 degrees swap the sides), without decoding."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            return (h, w) if im.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DatasetError(f"{path}: not a readable image ({type(e).__name__}); remove or replace it") from e


def check_sizes(pairs: list[Pair], scale: int = SCALE) -> None:
    """Every HQ must be exactly `scale` x its LQ; the error lists the first offenders."""
    bad = []
    for p in pairs:
        if p.lq is None:
            continue
        (w, h), (W, H) = _header_size(p.lq), _header_size(p.hq)
        if (W, H) != (scale * w, scale * h):
            bad.append(f"{p.name} (LQ {w}x{h}, HQ {W}x{H})")
    if bad:
        more = f" and {len(bad) - SHOW} more" if len(bad) > SHOW else ""
        raise DatasetError(
            f"HQ must be exactly {scale}x the LQ, but {len(bad)} pair(s) are not: {', '.join(bad[:SHOW])}{more}"
        )


# ------------------------------------------------------------------ named sets from the Hub


def fetch(name: str, cache_dir=None, progress: bool = True) -> tuple[Path, Path]:
    """(lq_dir, hq_dir) of a named set: the zip is downloaded into the HF cache on first use and
    extracted once beside it; later calls (also with HF_HUB_OFFLINE=1) only look the folders up."""
    if name not in NAMED:
        raise DatasetError(f"unknown dataset {name!r}; use one of: {', '.join(NAMED)} (or --lq DIR --hq DIR)")
    spec = NAMED[name]
    root = extract_once(_download(name, cache_dir, progress))
    folder = next((d for d in (root / spec.folder, *root.glob(f"*/{spec.folder}")) if d.is_dir()), None)
    if folder is None:
        raise DatasetError(
            f"the {ZIP_NAME} of {REPO_ID} has no {spec.folder} folder (extracted in {root}); "
            "delete that folder and the cached zip and retry"
        )
    return folder / spec.lq, folder / spec.hq


def _download(name: str, cache_dir, progress: bool) -> Path:
    try:
        return Path(
            hf_hub_download(
                REPO_ID,
                ZIP_NAME,
                repo_type="dataset",
                revision=REVISION,
                cache_dir=cache_dir,
                tqdm_class=None if progress else silent_tqdm,
            )
        )
    except (
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
    ) as e:  # first: LocalEntryNotFoundError is an EntryNotFoundError
        why = " (HF_HUB_OFFLINE is set)" if constants.is_offline_mode() else ""
        raise DatasetError(
            f"dataset {name} is not in the local cache and the Hub cannot be reached{why}; "
            "run once with a network, or pass --lq DIR --hq DIR"
        ) from e
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as e:
        raise DatasetError(
            f"{REPO_ID}@{REVISION} on the Hub has no {ZIP_NAME} ({type(e).__name__}); "
            "the test sets moved: pass --lq DIR --hq DIR with a local copy"
        ) from e
    except OSError as e:
        raise DatasetError(
            f"cannot download dataset {name} ({e.strerror or type(e).__name__}); check the network "
            "and free disk space, or pass --lq DIR --hq DIR"
        ) from e
    except Exception as e:  # httpx transport errors and other client failures
        raise DatasetError(
            f"downloading dataset {name} from {REPO_ID} failed ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); retry, or pass --lq DIR --hq DIR"
        ) from e


def extract_dir(zip_path: Path) -> Path:
    """Where a cached zip is extracted: <repo cache>/extracted/<commit>/ for a file in the HF cache
    (removed with the repo by `hf cache rm`), else a folder beside the zip."""
    snap = zip_path.parent
    if snap.parent.name == "snapshots":
        return snap.parent.parent / "extracted" / snap.name
    return zip_path.with_name(zip_path.stem + "_extracted")


def _safe_member(info: zipfile.ZipInfo) -> PurePosixPath | None:
    """The member's relative path, refusing absolute paths, '..' (zip-slip) and symlinks."""
    path = PurePosixPath(info.filename.replace("\\", "/"))
    if (
        path.is_absolute()
        or ".." in path.parts
        or re.match(r"^[A-Za-z]:", info.filename)
        or stat.S_ISLNK(info.external_attr >> 16)
    ):
        return None
    return path


def extract_once(zip_path: Path) -> Path:
    """Extract into a temp folder next to the target, then rename: a killed extraction leaves no
    half-filled folder that would later pass for a complete one."""
    target = extract_dir(zip_path)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=target.parent))
    try:
        with zipfile.ZipFile(zip_path) as zf:
            for info in zf.infolist():
                rel = _safe_member(info)
                if rel is None:
                    raise DatasetError(
                        f"{zip_path} has an unsafe entry {info.filename!r} (absolute path, '..' or "
                        "link); refusing to extract it"
                    )
                if not info.is_dir() and rel.parts and rel.parts[0] != "__MACOSX":
                    dst = tmp.joinpath(*rel.parts)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(dst, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # else another process finished first: use its copy
                raise
    except zipfile.BadZipFile as e:
        raise DatasetError(f"{zip_path} is not a valid zip ({e}); delete it and retry the download") from e
    except OSError as e:
        raise DatasetError(
            f"cannot extract {zip_path} into {target.parent} ({e.strerror or e}); check free disk space and permissions"
        ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ------------------------------------------------------------------ one entry point for the CLI


def resolve_pairs(
    dataset: str | None = None,
    lq=None,
    hq=None,
    degrade: str | None = None,
    seed: int = 0,
    cache_dir=None,
    progress: bool = True,
) -> tuple[list[Pair], str, dict]:
    """Pairs for one of: a named set, an LQ/HQ folder pair, or HQ + an on-the-fly degradation.

    Returns (pairs, label for titles and the default output folder, JSON description of the data,
    which results.json records and which keys resumed results)."""
    if dataset and (lq is not None or hq is not None or degrade):
        raise DatasetError("--dataset cannot be combined with --lq/--hq/--degrade; pick one source of images")
    if dataset:
        lq_dir, hq_dir = fetch(dataset, cache_dir, progress)
        return pair_folders(lq_dir, hq_dir), dataset, {"dataset": dataset, "repo": REPO_ID, "revision": REVISION}
    if hq is None and lq is not None:
        raise DatasetError("--lq needs --hq DIR with the matching HQ images")
    if hq is None:
        raise DatasetError(
            "no images to evaluate: pass --dataset NAME, --lq DIR --hq DIR, or --hq DIR --degrade PRESET"
        )
    hq = Path(hq)
    if lq is not None and degrade:
        raise DatasetError("--lq and --degrade exclude each other: the LQ comes either from a folder or from --degrade")
    if lq is not None:
        lq = Path(lq)
        return pair_folders(lq, hq), hq.resolve().name, {"lq": str(lq.resolve()), "hq": str(hq.resolve())}
    if not degrade:
        raise DatasetError("--hq needs either --lq DIR (real LQ images) or --degrade PRESET (LQ made from the HQ)")
    return (
        synthetic_pairs(hq, degrade, seed),
        f"{hq.resolve().name}-{degrade}",
        {"hq": str(hq.resolve()), "degrade": degrade, "degrade_seed": seed},
    )

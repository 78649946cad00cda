"""Training images: a folder (recursive), a text file list, or a Hugging Face dataset id; HQ crops + online
degradation."""

from __future__ import annotations

import re
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import snapshot_download

from teasr_cli.degrade import random_crop_flip
from teasr_cli.errors import TeasrError
from teasr_cli.imageio import IMAGE_SUFFIXES, find_images, read_rgb8


def list_images(source: str) -> list[Path]:
    """Image paths from a folder (recursive), a .txt file with one path per line, or a Hub dataset `org/name[@rev]`."""
    p = Path(source)
    if p.is_dir():
        files = find_images(p, recursive=True)
    elif p.is_file() and p.suffix == ".txt":
        lines = [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        files = [Path(ln) if Path(ln).is_absolute() else p.parent / ln for ln in lines]
    elif re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w./-]+)?", source) and not p.exists():
        repo, _, rev = source.partition("@")
        try:
            root = snapshot_download(
                repo, repo_type="dataset", revision=rev or None, allow_patterns=[f"*{s}" for s in IMAGE_SUFFIXES]
            )
        except Exception as e:  # hub errors carry long multi-line texts; one line is enough here
            why = str(e).splitlines()[0]
            raise TeasrError(f"cannot get dataset {source!r} from the Hugging Face Hub: {why}") from None
        return list_images(root)
    else:
        raise TeasrError(f"--data {source}: no such folder or .txt list, and not a Hub dataset id (org/name)")
    if not files:
        raise TeasrError(f"--data {source}: no images found")
    return files


class HQImages:
    """Random-access HQ crops, read from disk (EXIF orientation applied) with the last `cache` decoded photos kept
    in memory (LRU: a data set of any size fits, and a small one is read once); unreadable or too-small images are
    skipped (counted, never fatal)."""

    def __init__(self, files: list[Path], crop: int, small: str = "skip", cache: int = 64):
        if small not in ("skip", "pad"):
            raise TeasrError(f"small-image policy must be skip or pad, not {small!r}")
        self.files, self.crop, self.small, self.cache = list(files), crop, small, cache
        self._mem: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.skipped: set[int] = set()

    def __len__(self):
        return len(self.files)

    def load(self, i: int) -> torch.Tensor | None:
        """uint8 (3, H, W), or None if the file cannot be used."""
        if i in self._mem:
            self._mem.move_to_end(i)
            return self._mem[i]
        if i in self.skipped:
            return None
        try:
            img = read_rgb8(self.files[i])
        except Exception:  # a bad file in a 90k-image set must not end a long run
            img = None
        if img is not None and min(img.shape[1:]) < self.crop:
            if self.small == "pad":
                ph, pw = max(0, self.crop - img.shape[1]), max(0, self.crop - img.shape[2])
                mode = "reflect" if min(img.shape[1:]) > max(ph, pw) else "replicate"
                img = F.pad(img[None].float(), (0, pw, 0, ph), mode=mode)[0].to(torch.uint8)
            else:
                img = None
        if img is None:
            self.skipped.add(i)
            warnings.warn(f"skipping unusable training image {self.files[i]}")
        elif self.cache > 0:
            self._mem[i] = img
            if len(self._mem) > self.cache:
                self._mem.popitem(last=False)
        return img

    def crop_at(self, index: int, generator: torch.Generator) -> torch.Tensor:
        """A random crop (+ flips) in [0, 1] from image `index`, or from the next usable one."""
        for k in range(len(self.files)):
            img = self.load((index + k) % len(self.files))
            if img is not None:
                return random_crop_flip(img, self.crop, generator).float() / 255  # crop first: whole photos are big
        raise TeasrError("no usable training images (all unreadable or smaller than the crop)")


def sample_index(seed: int, sample: int, n: int) -> int:
    """The dataset index of global sample number `sample`: a fresh permutation per epoch, a pure function
    of (seed, sample) so a resumed run sees exactly the data it would have seen."""
    epoch, pos = divmod(sample, n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return int(perm[pos])

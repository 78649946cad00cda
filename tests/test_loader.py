"""Worker-made training batches equal the main-process ones, whatever the worker count and process layout."""

from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from teasr_cli.data import HQImages
from teasr_cli.loader import batch_stream
from teasr_cli.trainer import TrainConfig, make_batch


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(np.asarray(getattr(skdata, name)())).resize((128, 96)).save(d / f"{name}.png")
    cfg = TrainConfig.load(None, data=str(d), crop=64, degradation={"realesrgan": 1, "mild": 1, "bicubic": 1}, seed=3)
    images = HQImages(sorted(d.glob("*.png")), cfg.crop)
    return partial(make_batch, images, cfg, latent_shape=(48, 16, 16))


def take(stream, n):
    return [next(stream) for _ in range(n)]


def same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
    assert a[2].keys() == b[2].keys()
    for k in a[2]:
        torch.testing.assert_close(a[2][k], b[2][k], rtol=0, atol=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_is_the_trainers_batches(setup, workers):
    # 2 processes, rank 1, from micro-batch 5 (a resumed run): global samples (m * 2 + 1) * 3 ...
    got = take(batch_stream(setup, 3, 5, num_processes=2, rank=1, workers=workers), 3)
    for i, b in enumerate(got):
        same(b, setup(first_sample=((5 + i) * 2 + 1) * 3, n=3, device="cpu"))


def test_worker_count_does_not_change_batches(setup):
    ref = take(batch_stream(setup, 4, 0, workers=0), 4)
    for w, b in zip(ref, take(batch_stream(setup, 4, 0, workers=2), 4)):
        same(w, b)
    assert not torch.equal(ref[0][0], ref[1][0])  # consecutive batches are different samples

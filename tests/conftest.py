"""Shared fixtures: tiny DiT models (fresh or randomised), a saved model folder, real photos."""

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from teasr_cli.codecs import PixelUnshuffleCodec
from teasr_cli.folders import model_config, save_pretrained
from teasr_cli.model import DiTConfig, TeasrDiT

# two cores shared with other workers: one thread keeps timings stable and results reproducible
torch.set_num_threads(1)

TINY = dict(latent_channels=48, patch_size=2, hidden_size=64, depth=2, num_heads=4)


def tiny_config(**overrides) -> DiTConfig:
    return DiTConfig(**{**TINY, **overrides})


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Perturb every parameter, so the zero-initialised adaLN/final layers do something.

    A fresh adaLN-Zero model outputs exactly zero, which would make most tests pass vacuously.
    """
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * std)
    return model


def build_model(seed: int = 0, random: bool = True, **overrides) -> TeasrDiT:
    torch.manual_seed(seed)
    model = TeasrDiT(tiny_config(**overrides))
    return (randomize(model, seed) if random else model).eval()


@pytest.fixture
def make_model():
    """make_model(seed=0, random=True, **DiTConfig overrides) -> a tiny TeasrDiT in eval mode."""
    return build_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny model folder (config.json + model.safetensors) with seeded non-zero weights."""
    folder = tmp_path_factory.mktemp("tiny-model")
    model = build_model(seed=0)
    save_pretrained(model, model_config(model.config, PixelUnshuffleCodec(4).config()), folder)
    return folder


def small_photo(name: str = "astronaut", size=(48, 40)) -> Image.Image:
    """A real photo from scikit-image, downscaled to `size` (W, H) with a good filter."""
    arr = getattr(skdata, name)()
    return Image.fromarray(np.asarray(arr)).convert("RGB").resize(size, Image.Resampling.LANCZOS)


def to_tensor(img) -> torch.Tensor:
    """An RGB PIL image or (H, W, 3) uint8 array -> (1, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]


@pytest.fixture
def photo() -> Image.Image:
    """A small real RGB photo (astronaut, 48x40)."""
    return small_photo()


def assert_one_line_error(result, *words):
    """A CliRunner result that failed with one handled `error: ...` line containing `words`."""
    text = result.output.strip()
    assert result.exit_code not in (0, None), text
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # handled, not a crash
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    assert text.startswith("error:") and all(w in text for w in words), text

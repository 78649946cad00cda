"""The model card of an exported folder: README.md with the Hugging Face Hub's metadata header (licence, tags,
base model) and the training recipe, so that the folder can be pushed to the Hub as it is."""

from __future__ import annotations

import json
import re
from pathlib import Path

from teasr_cli import __version__
from teasr_cli.imageio import write_text_atomic

_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def _base_model(recipe: dict) -> str | None:
    """The Hub model this one was trained from, if any: the qwen-image base, or an --init that is a Hub repo."""
    if recipe.get("backbone") == "qwen-image" and recipe.get("base") not in (None, "tiny"):
        return str(recipe["base"]).partition("@")[0]
    init = str(recipe.get("init") or "").partition("@")[0]
    return init if _REPO_ID.fullmatch(init) and not Path(init).exists() else None


def model_card(name: str, recipe: dict, trained: dict | None = None, dtype: str = "fp32") -> str:
    """README.md text: YAML front matter the Hub reads (strings JSON-quoted, which is valid YAML), then prose."""
    base = _base_model(recipe)
    trained = trained or {}
    meta = {
        "license": "apache-2.0",
        "library_name": "teasr",
        "pipeline_tag": "image-to-image",
        "tags": ["super-resolution", "image-upscaling", "diffusion", "teasr", f"stage-{recipe.get('stage')}"],
    }
    header = [f"{k}: {json.dumps(v)}" for k, v in meta.items()] + ([f"base_model: {json.dumps(base)}"] if base else [])
    steps = trained.get("steps", recipe.get("steps"))
    return "\n".join(
        [
            "---",
            *header,
            "---",
            "",
            f"# {name}",
            "",
            f"An x{recipe.get('scale', 4)} photo upscaler for [teasr](https://pypi.org/project/teasr/): a "
            f"{recipe.get('backbone', 'native')} any-step diffusion transformer, trained in stage "
            f"`{recipe.get('stage')}` for {steps} steps on `{recipe.get('data')}` and exported by teasr {__version__} "
            f"with {dtype} weights.",
            "",
            "## Use",
            "",
            "```bash",
            "teasr upscale photo.jpg --model ORG/NAME          # this folder, or its Hub repo; -n 4 for 4 steps",
            "```",
            "",
            "## Training recipe",
            "",
            "The run's `train_config.json`; `teasr train -c RECIPE.toml` with these values reproduces it.",
            "",
            "```json",
            json.dumps(recipe, indent=2, sort_keys=True),
            "```",
            "",
        ]
    )


def write_model_card(folder, run, dtype: str = "fp32") -> Path:
    """Write README.md into an exported model `folder` from the training `run` (a run folder or one ckpt-*)."""
    folder, run = Path(folder), Path(run)
    run = run.parent if (run / "state.json").exists() else run  # a ckpt-* folder lives in its run
    recipe = json.loads((run / "train_config.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    return write_text_atomic(
        folder / "README.md", model_card(folder.resolve().name, recipe, config.get("trained"), dtype)
    )

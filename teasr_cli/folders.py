"""Model folders (DESIGN.md section 6): config.json + model.safetensors, the one format every backbone is saved in.

config.json says which backbone reads the weights (`backbone`, "native" when absent), the format version, the
scale and the backbone's own settings; model.safetensors holds the tensors that backbone needs beyond what it
can rebuild (all of them for the native DiT, LoRA + embeddings for a Hub base). Only safetensors is ever read,
so loading a model never unpickles anything.

Each backbone is a module that defines BACKBONE, an object with the `Backbone` interface below (as diffusers'
ModelMixin or huggingface_hub's ModelHubMixin give every model the same save/load): this module finds it by
name in BACKBONES and does the reading, checking and atomic writing for all of them.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from teasr_cli.errors import ModelError
from teasr_cli.imageio import atomic_path

FORMAT_VERSION = 1
CONFIG, WEIGHTS = "config.json", "model.safetensors"
# name -> the module that defines BACKBONE; imported on first use, so a backbone's extras (diffusers...) and its
# own imports of this module never load the others.
BACKBONES = {"native": "teasr_cli.backbones.native", "qwen-image": "teasr_cli.backbones.qwen_image"}


class Backbone:
    """What folders and the trainer need from a model family; the defaults suit a model that is all its weights."""

    name = ""

    def build(self, config: dict, state: dict | None = None, dtype: torch.dtype | None = None) -> nn.Module:
        """The model a folder config describes. `state`: the folder's tensors when loading one (loaded by
        load_pretrained after this; given for backbones that need some of them to build); None for a new model."""
        raise NotImplementedError

    def new_config(self, train) -> dict:
        """The folder config of a new model for a training recipe (trainer.TrainConfig)."""
        raise NotImplementedError

    def check(self, train) -> None:
        """Raise TeasrError for a training recipe this backbone cannot run (e.g. a stage it has no use for)."""

    def add_cond_lora(self, model: nn.Module, rank: int, alpha: float) -> None:
        """Freeze the model and make a LoRA on its condition branch the trainable part."""
        raise NotImplementedError

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What a trained model holds beyond its frozen base (live tensors, not copies)."""
        return model.state_dict()

    def folder_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What its model folder stores (live tensors): by default the trainable state."""
        return self.trainable_state(model)

    def folder_config(self, model: nn.Module, config: dict) -> dict:
        """`config` completed with what the model itself knows (sizes, base, LoRA)."""
        return config

    def weights_dtype(self, mixed_precision: str) -> torch.dtype | None:
        """The dtype to train in for a mixed-precision setting; None keeps float32 master weights."""
        return None

    def grow(self, model: nn.Module, config: dict, train) -> tuple[nn.Module, dict]:
        """An --init model adapted to the recipe's `model` settings (e.g. a new head that starts as the identity);
        by default the model as it is."""
        return model, config

    def export(
        self,
        model: nn.Module,
        config: dict,
        folder,
        ema: dict | None = None,
        lora_rank: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> Path:
        """Write a trained model's folder: EMA weights in place of the live ones, training-only wrappers gone."""
        raise NotImplementedError


def model_config(model, codec: dict, scale: int = 4, backbone: str = "native", **meta) -> dict:
    """The config.json of a model with its own sizes `model` (a config with to_dict(), e.g. DiTConfig)."""
    return {
        "teasr_format": FORMAT_VERSION,
        "backbone": backbone,
        "scale": scale,
        "codec": codec,
        "model": model.to_dict(),
        **meta,
    }


def backbone(name: str, where: str = "") -> Backbone:
    if name not in BACKBONES:
        raise ModelError(f"unknown backbone {name!r}{where} (known: {', '.join(BACKBONES)})")
    return importlib.import_module(BACKBONES[name]).BACKBONE


def read_config(folder) -> dict:
    path = Path(folder) / CONFIG
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {path}: {e}") from None


def save_pretrained(model: nn.Module, config: dict, folder, dtype: torch.dtype | None = None) -> Path:
    """Write config.json + model.safetensors, each atomically; `config["backbone"]` says whose (native if absent).

    dtype casts the floating-point tensors on the way out (e.g. fp16 for a smaller file)."""
    bb = backbone(config.get("backbone", "native"))
    config = {**bb.folder_config(model, config), "teasr_format": FORMAT_VERSION, "backbone": bb.name}
    state = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
        for k, v in bb.folder_state(model).items()
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    with atomic_path(folder / CONFIG) as cfg_tmp, atomic_path(folder / WEIGHTS) as w_tmp:  # weights renamed first
        save_file(state, w_tmp, metadata={"format": "pt"})
        os.chmod(w_tmp, 0o666 & ~umask)  # safetensors writes 0600; a model is for sharing
        cfg_tmp.write_text(json.dumps(config, indent=2) + "\n")
    return folder


def load_state_strict(own: dict[str, torch.Tensor], state: dict, source: str) -> None:
    """Copy `state` into the live tensors `own` (each keeps its dtype), with a one-line ModelError that says how
    the weights and the config disagree."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        detail = "; ".join(
            s
            for s in (
                f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
                f"{len(shapes)} with other shapes (e.g. {shapes[0]}: {tuple(state[shapes[0]].shape)} "
                f"vs {tuple(own[shapes[0]].shape)})"
                if shapes
                else "",
            )
            if s
        )
        raise ModelError(f"weights in {source} do not match its config.json: {detail}")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


def load_pretrained(folder, dtype: torch.dtype | None = None, device=None) -> tuple[nn.Module, dict]:
    """(model, config) from a local model folder, in eval mode; float32 weights on the CPU unless dtype/device
    say otherwise (a Hub-base backbone may default to its own dtype)."""
    folder = Path(folder)
    config = read_config(folder)
    bb = backbone(config.get("backbone", "native"), f" in {folder / CONFIG}")
    try:
        state = load_file(folder / WEIGHTS)
    except (OSError, SafetensorError) as e:
        raise ModelError(f"cannot read {folder / WEIGHTS}: {e}") from None
    try:
        model = bb.build(config, state, dtype)
    except (KeyError, TypeError, ValueError, AssertionError) as e:
        raise ModelError(f"invalid model config in {folder / CONFIG}: {e}") from None
    except ModelError as e:  # the backbone's own reason, said of this folder
        raise ModelError(f"{folder}: {e}") from None
    load_state_strict(bb.folder_state(model), state, str(folder / WEIGHTS))
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
        if getattr(model, "codec", None) is not None:  # a backbone's own codec is not a submodule
            model.codec.to(device)
    return model.eval(), config

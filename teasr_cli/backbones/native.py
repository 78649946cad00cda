"""The native dual-branch DiT (teasr_cli.model) as a folders.Backbone: the folder holds every weight."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn

from teasr_cli.codecs import build_codec
from teasr_cli.errors import TeasrError
from teasr_cli.folders import Backbone, model_config, save_pretrained
from teasr_cli.lora import add_lora, export_lora
from teasr_cli.model import DiTConfig, TeasrDiT

GROWABLE = ("head_channels", "head_depth")  # parts a trained model can gain: they start as the identity


class NativeBackbone(Backbone):
    name = "native"

    def build(self, config: dict, state: dict | None = None, dtype: torch.dtype | None = None) -> TeasrDiT:
        return TeasrDiT(DiTConfig.from_dict(config["model"]))

    def new_config(self, train) -> dict:
        codec = build_codec(train.codec)
        dit = DiTConfig.from_dict({"latent_channels": codec.latent_channels, **train.model})
        return model_config(dit, train.codec, train.scale)

    def check(self, train) -> None:
        if train.stage == "sad" and not train.init:
            raise TeasrError("--stage sad needs --init MODEL_DIR (the prior to distil)")

    def add_cond_lora(self, model: nn.Module, rank: int, alpha: float) -> None:
        if not model.config.depth:  # the LoRA's targets are the DiT blocks' condition path
            raise TeasrError("stage sad needs a model with DiT blocks (depth > 0); this one is conv-only")
        add_lora(model, rank, alpha)

    def grow(self, model: TeasrDiT, config: dict, train) -> tuple[TeasrDiT, dict]:
        """--init with a recipe whose `model` adds a conv head (stage prior/regress) or makes the head deeper (any
        stage; sad needs train_head): the new model keeps every trained weight and starts as the same function.
        Any other model setting comes from --init, as before (its weights fix the shapes)."""
        changed = {k: train.model[k] for k in GROWABLE if k in train.model and config["model"].get(k) != train.model[k]}
        deeper = model.head is not None and set(changed) == {"head_depth"}
        if not changed or (train.stage == "sad" and not (deeper and train.train_head)):  # SAD keeps the prior's shape
            return model, config
        grown = TeasrDiT(DiTConfig.from_dict({**config["model"], **changed}))
        missing, unexpected = grown.load_state_dict(model.state_dict(), strict=False)
        if unexpected or any(not k.startswith("head.") for k in missing):
            raise TeasrError(f"cannot grow {train.init}: {len(missing)} missing, {len(unexpected)} unexpected weights")
        if deeper:  # a residual conv with zero weights is the identity; a new head is already one (its output is zero)
            with torch.no_grad():
                for k in missing:
                    grown.get_parameter(k).zero_()
        return grown, {**config, "model": grown.config.to_dict()}

    def export(
        self,
        model: nn.Module,
        config: dict,
        folder,
        ema: dict | None = None,
        lora_rank: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> Path:
        """A copy with the EMA weights and the peft LoRA as plain condition-branch modules (no peft at inference)."""
        model = copy.deepcopy(model).cpu()
        if ema:
            params = dict(model.named_parameters())
            for n, v in ema.items():
                params[n].data.copy_(v)
        if any("lora_" in n for n, _ in model.named_parameters()):
            export_lora(model, lora_rank)
        return save_pretrained(model, {**config, "model": model.config.to_dict()}, folder, dtype)


BACKBONE = NativeBackbone()

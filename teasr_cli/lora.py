"""LoRA on the condition branch only (peft), and its export as plain condition-branch weights."""
from __future__ import annotations

import torch
import torch.nn as nn

from teasr_cli.model import LORA_TARGETS, TwinLinear

# Modules that only ever see condition tokens: trained in full alongside the LoRA
COND_ONLY = ("c_embedder.", "t2_embedder.")


def add_lora(model: nn.Module, rank: int, alpha: float, targets: str = LORA_TARGETS) -> nn.Module:
    """Freeze the model (the noise branch is the generative prior), add peft LoRA to the targets.

    The model routes only condition tokens through the LoRA (`model.branch_linear`), so the noise
    branch keeps computing exactly what the frozen base computes.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if getattr(model.config, "cond_weights", False):
        raise ValueError("this model already has merged condition-branch weights; start LoRA from a plain prior")
    model.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0), model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or name.startswith(COND_ONLY))
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Replace each LoRA layer by a TwinLinear whose `cond` weight is base + B A * scale (exact, no peft at inference)."""
    from peft.tuners.lora import LoraLayer

    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoraLayer):
            base = mod.get_base_layer()
            twin = TwinLinear(base)
            for adapter in mod.active_adapters:
                twin.cond.weight += mod.get_delta_weight(adapter).to(base.weight.dtype)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, twin)
    model.config.cond_weights = True
    return model

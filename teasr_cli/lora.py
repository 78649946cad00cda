"""LoRA on the condition branch only (peft), and its export as plain (peft-free) condition-branch LoRA modules."""

from __future__ import annotations

import torch
import torch.nn as nn

from teasr_cli.errors import TeasrError
from teasr_cli.model import LORA_TARGETS, CondLoRALinear

# Modules that only ever see the condition path (tokens, or the hybrid's LQ conv trunk): trained in full beside the LoRA
COND_ONLY = ("c_embedder.", "t2_embedder.", "trunk.")


def add_lora(model: nn.Module, rank: int, alpha: float, targets: str = LORA_TARGETS) -> nn.Module:
    """Freeze the model (the noise branch is the generative prior), add peft LoRA to the targets.

    A model exported from stage sad keeps its condition-branch LoRA: it becomes the first `rank` components of
    the new one (training continues from the same function, with more rank if asked).

    The model routes only condition tokens through the LoRA (`model.branch_linear`), so the noise
    branch keeps computing exactly what the frozen base computes.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    exported = unwrap_cond_lora(model)
    model.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0), model)
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and name in exported:  # continue an exported SAD model: the same function
            down, up, scale = exported[name]
            if down.shape[0] > rank:
                raise TeasrError(
                    f"the model's condition-branch LoRA has rank {down.shape[0]}; "
                    f"continue it with rank >= that, not {rank}"
                )
            (adapter,) = mod.active_adapters
            with torch.no_grad():  # the extra rank starts at zero (lora_B), so the output is unchanged
                mod.lora_A[adapter].weight[: down.shape[0]].copy_(down)
                mod.lora_B[adapter].weight.zero_()[:, : down.shape[0]].copy_(up * (scale / mod.scaling[adapter]))
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or name.startswith(COND_ONLY))
    return model


def unwrap_cond_lora(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Put each exported CondLoRALinear's base linear back in its place; return its factors by module name."""
    found = {}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, CondLoRALinear):
            found[name] = (mod.lora_down.weight.detach(), mod.lora_up.weight.detach(), mod.scale)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, mod.base_layer)
    if found:
        model.config.cond_lora_rank = model.config.cond_lora_alpha = 0
    return found


@torch.no_grad()
def export_lora(model: nn.Module, rank: int | None = None) -> nn.Module:
    """Replace each peft LoRA layer by a CondLoRALinear with the same weights (exact; no peft at inference).

    `rank` below the trained one keeps each delta's strongest components (truncated SVD: the best approximation of
    that rank), for a smaller file; alpha then equals the rank, so the scale is 1.
    """
    from peft.tuners.lora import LoraLayer

    r_out = alpha = None
    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoraLayer):
            (adapter,) = mod.active_adapters
            down, up, scale = mod.lora_A[adapter].weight, mod.lora_B[adapter].weight, mod.scaling[adapter]
            r_out, alpha = mod.r[adapter], mod.lora_alpha[adapter]
            if rank is not None and rank < r_out:
                u, s, vh = torch.linalg.svd((up.double() * scale) @ down.double(), full_matrices=False)
                root = s[:rank].sqrt()
                up, down, scale = (u[:, :rank] * root).to(up.dtype), (root[:, None] * vh[:rank]).to(down.dtype), 1.0
                r_out = alpha = rank
            plain = CondLoRALinear(mod.get_base_layer(), r_out, alpha)
            plain.scale = scale
            plain.lora_down.weight.copy_(down)
            plain.lora_up.weight.copy_(up)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, plain)
    if r_out is not None:
        model.config.cond_lora_rank, model.config.cond_lora_alpha = r_out, alpha
    return model

"""GPU memory of one training step on the 20B Qwen-Image backbone: TEASR's SAD vs a 3-model distillation.

    python benchmarks/qwen_memory_budget.py [--crop 512] [--rank 128] [--gpu-gib 80]

Nothing is allocated: the real diffusers QwenImageTransformer2DModel / AutoencoderKLQwenImage are built
on the `meta` device from the published configs, parameters are counted from them, and activation
memory is measured by running their forward passes on meta tensors and adding up what autograd saves
for backward (parameters excluded, views of one tensor counted once).

Assumptions (all printed rows follow from these):
- frozen base weights in bf16; trainable weights (LoRA + t2_embedder) fp32 with fp32 grads and AdamW's
  two fp32 moments: 16 bytes per trainable parameter;
- attention saves what flash/memory-efficient SDPA saves (q, k, v, out, logsumexp), not the L x L matrix;
- gradient checkpointing per transformer block: each graph keeps every block's inputs, and backward
  re-runs one block at a time (workspace: that block's saved activations and about as much again for
  its gradients);
- a graph is alive from its forward to the single backward of the summed loss (as in teasr_cli.sad):
  SAD keeps 4 transformer graphs (flow, consistency v1, one-step F, fake-trajectory) + the VAE decoder
  graph of the pixel loss; its 4 no-grad forwards only need transient memory.
  The 3-model distillation (OSEDiff-style, as published: separate frozen teacher, trainable fake-score
  copy, student) keeps 2 transformer graphs (student, fake-score diffusion loss) + the VAE decoder graph,
  and 3 copies of the backbone weights; two LoRA sets train;
- LPIPS's network (AlexNet, tens of MB at 512^2) and the CUDA context / allocator slack are left out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# transformer/config.json of Qwen/Qwen-Image (Qwen-Image-2512 keeps the architecture), as published on the Hub
QWEN_IMAGE_20B = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=60,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=3584,
    axes_dims_rope=(16, 56, 56),
    guidance_embeds=False,
)
# vae/config.json: diffusers' AutoencoderKLQwenImage defaults are that config (base_dim 96, z_dim 16, ...)
QWEN_IMAGE_VAE: dict = {}
EMPTY_PROMPT_TOKENS = 5  # the empty prompt after the pipeline drops its 34 template tokens (negligible either way)
GIB = 2**30


def saved_bytes(fn, params) -> int:
    """Bytes autograd saves for backward while `fn()` runs (parameters excluded, each base tensor once)."""
    skip, seen = {id(p) for p in params}, {}

    def pack(t):
        base = t._base if t._base is not None else t
        if id(base) not in skip:
            seen[id(base)] = base.numel() * base.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


class _FlashLikeSDPA(torch.autograd.Function):
    """Stands in for SDPA on meta tensors, saving what fused attention kernels save."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the graphs here are only measured
        raise NotImplementedError


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return _FlashLikeSDPA.apply(query, key, value)


def build_meta(rank: int):
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from diffusers.utils import logging

    from teasr_cli.backbones.qwen_image import QwenImageTeasr, add_lora

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # its "cast with from_pretrained" advice is moot for meta tensors
    try:
        with torch.device("meta"):
            tr = QwenImageTransformer2DModel(**QWEN_IMAGE_20B)
            base_params = sum(p.numel() for p in tr.parameters())
            model = QwenImageTeasr(
                tr.to(torch.bfloat16), None, torch.zeros(1, EMPTY_PROMPT_TOKENS, QWEN_IMAGE_20B["joint_attention_dim"])
            )
            add_lora(model, rank, rank)
            vae = AutoencoderKLQwenImage(**QWEN_IMAGE_VAE).to(torch.bfloat16)
    finally:
        logging.set_verbosity(verbosity)
    return model, vae, base_params


def measure(model, vae, crop: int) -> dict:
    """Activation bytes at a crop x crop training image (all on meta)."""
    f = 2 ** len(vae.temperal_downsample)  # 8: image pixels per latent pixel
    C, s = model.config.latent_channels, crop // f
    z = torch.zeros(1, C, s, s, device="meta", requires_grad=True)
    params = list(model.parameters())
    sdpa, F.scaled_dot_product_attention = F.scaled_dot_product_attention, _sdpa
    try:
        graph = saved_bytes(lambda: model(z, 1.0, z.detach(), 0.0), params)
        # one block alone, inputs as in the model: [noise ; cond] image tokens, text tokens, two temb groups
        tr, D = model.transformer, model.transformer.inner_dim
        n, L = (s // 2) ** 2, EMPTY_PROMPT_TOKENS
        img = torch.zeros(1, 2 * n, D, device="meta", dtype=torch.bfloat16, requires_grad=True)
        txt = torch.zeros(1, L, D, device="meta", dtype=torch.bfloat16, requires_grad=True)
        temb = torch.zeros(2, D, device="meta", dtype=torch.bfloat16, requires_grad=True)
        index = torch.zeros(1, 2 * n, dtype=torch.int, device="meta")
        rope = model._rope(s // 2, s // 2, L, torch.device("meta"))
        block = saved_bytes(lambda: tr.transformer_blocks[0](img, txt, None, temb, rope, None, index), params)
    finally:
        F.scaled_dot_product_attention = sdpa
    # gradient checkpointing keeps each block's inputs: image + text stream (bf16); temb/rope are shared
    boundary = len(tr.transformer_blocks) * (2 * n + L) * D * 2
    zl = torch.zeros(1, C, 1, s, s, device="meta", dtype=torch.bfloat16, requires_grad=True)
    decoder = saved_bytes(lambda: vae.decode(zl), list(vae.parameters()))
    return {"graph": graph, "block": block, "boundary": boundary, "decoder": decoder, "tokens": 2 * n + L}


# (name, backbone copies, transformer graphs alive at backward, LoRA sets trained, pixel loss through the VAE)
SETUPS = [("LoRA flow matching", 1, 1, 1, False), ("TEASR SAD", 1, 4, 1, True), ("3-model distill.", 3, 2, 2, True)]


def budget(
    base_params: int,
    vae_params: int,
    trainable: int,
    act: dict,
    copies: int,
    graphs: int,
    lora_sets: int,
    pixel_loss: bool,
) -> list[tuple[str, int]]:
    rows = [
        ("backbone weights, bf16", copies * base_params * 2),
        ("VAE weights, bf16", vae_params * 2),
        ("trainable fp32 (LoRA + t2_embedder) + grads + AdamW m, v", lora_sets * trainable * 16),
        ("activations kept: graphs x per-block inputs (checkpointing)", graphs * act["boundary"]),
        ("backward workspace: one block re-run + its gradients", 2 * act["block"]),
        ("VAE decoder graph (pixel loss at the crop size)", act["decoder"] if pixel_loss else 0),
    ]
    return rows + [("total", sum(b for _, b in rows))]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--crop", type=int, default=512, help="training crop (HR pixels)")
    ap.add_argument("--rank", type=int, default=128, help="LoRA rank (= alpha)")
    ap.add_argument(
        "--gpu-gb", type=float, default=80.0, help="GPU memory in GB (10^9 bytes), e.g. 80 for an H100/A100"
    )
    args = ap.parse_args(argv)

    model, vae, base_params = build_meta(args.rank)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    vae_params = sum(p.numel() for p in vae.parameters())
    act = measure(model, vae, args.crop)
    tables = {name: budget(base_params, vae_params, trainable, act, *rest) for name, *rest in SETUPS}
    gpu = args.gpu_gb * 1e9 / GIB

    print(
        f"Qwen-Image transformer {base_params:,} params; condition-branch LoRA rank {args.rank}: {lora:,} "
        f"(+ t2_embedder {trainable - lora:,}); VAE {vae_params:,}"
    )
    print(
        f"training crop {args.crop}x{args.crop}: {act['tokens']} tokens per transformer forward "
        f"(noise + condition + empty prompt)"
    )
    print(
        f"one transformer graph: {act['graph'] / GIB:.1f} GiB without gradient checkpointing, "
        f"{act['boundary'] / GIB:.2f} GiB with it\n"
    )
    w = 62
    print(f"{'GiB':<{w}}" + "".join(f"{name:>20}" for name, *_ in SETUPS))
    print(
        f"{'(backbone copies / graphs alive / LoRA sets)':<{w}}"
        + "".join(f"{f'{c} / {g} / {n}':>20}" for _, c, g, n, _ in SETUPS)
    )
    for i, (label, _) in enumerate(tables[SETUPS[0][0]]):
        print(f"{label:<{w}}" + "".join(f"{tables[name][i][1] / GIB:>20.1f}" for name, *_ in SETUPS))
    verdict = ["fits" if tables[name][-1][1] <= gpu * GIB else "does NOT fit" for name, *_ in SETUPS]
    print(f"{f'one {args.gpu_gb:g} GB GPU = {gpu:.1f} GiB':<{w}}" + "".join(f"{v:>20}" for v in verdict))
    sad = dict(tables["TEASR SAD"])
    print(
        f"\nwithout gradient checkpointing SAD would keep {4 * act['graph'] / GIB:.0f} GiB of activations "
        f"(total {(sad['total'] - sad[tables['TEASR SAD'][3][0]] + 4 * act['graph']) / GIB:.0f} GiB)"
    )
    three = dict(tables["3-model distill."])
    shared = three["total"] - 2 * base_params * 2
    print(
        f"a 3-model variant sharing one frozen base between its three networks through peft adapters: "
        f"{shared / GIB:.0f} GiB, with 3 adapters' forwards per step"
    )
    return {name: dict(rows) for name, rows in tables.items()} | {
        "activations": act,
        "base_params": base_params,
        "lora_params": lora,
        "trainable": trainable,
        "gpu_gib": gpu,
    }


if __name__ == "__main__":
    main()

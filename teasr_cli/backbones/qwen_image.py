"""Qwen-Image (20B MMDiT, via diffusers) as a TEASR backbone: `v = model(z_t, t_cur, z_lq, t_tar)`.

How the dual-branch DTC model of DESIGN.md section 2 maps onto `QwenImageTransformer2DModel`:

    image stream = [noise tokens (z_t packed 2x2) ; condition tokens (z_lq packed 2x2)]
    modulation   = per token (`zero_cond_t` / `modulate_index`, diffusers >= 0.37): noise tokens from
                   time_text_embed(t_cur), condition tokens from t2_embedder(t_tar), a copy of
                   time_text_embed at the start (diffusers' own zero_cond_t feeds them t = 0 instead)
    text stream  = a fixed empty-prompt embedding, computed once with the text encoder and stored with
                   the model, so inference never loads the 7B text encoder
    RoPE         = condition tokens reuse the noise tokens' (frame, y, x) ids, so attention is spatially
                   aligned ("shared"); "edit" puts them on frame 1, as Qwen-Image-Edit places its references
    LoRA         = peft, reaching condition tokens only (CondRouter below)

The forward re-runs the transformer's short top-level loop with its own submodules instead of calling
`transformer.forward`, because that forward hard-wires t = 0 for the second group and puts a second image
on frame 1. The 60 blocks, the checkpoint format and `from_pretrained` stay diffusers' own.
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from huggingface_hub import snapshot_download

from teasr_cli.codecs import DiffusersAutoencoder
from teasr_cli.errors import ModelError, TeasrError
from teasr_cli.folders import Backbone, save_pretrained
from teasr_cli.hub import parse_repo_spec

# The base model and the revision a teasr LoRA was trained against. A LoRA only makes sense on the exact
# weights it was trained on, so this must be a 40-hex commit sha. The build machines cannot reach the Hub,
# so no sha could be looked up here and the value below is a placeholder (the moving branch "main").
# Pin it from a machine with network access:
#     python -c "from huggingface_hub import model_info; print(model_info('Qwen/Qwen-Image-2512').sha)"
# Until then from_base() warns, and the commit it actually loaded (the Hub cache's snapshot folder name)
# is what save_pretrained() records, so every saved teasr model is pinned regardless.
QWEN_IMAGE_REVISION_PLACEHOLDER = "main"
QWEN_IMAGE_BASE = ("Qwen/Qwen-Image-2512", QWEN_IMAGE_REVISION_PLACEHOLDER)

OFFLOAD_MODES = ("none", "model", "sequential")  # see enable_offload

# Image-stream Linears the condition branch adapts (regex for peft's LoraConfig, matched against full names).
# They sit inside CondRouter modules, hence the trailing `.linear`. img_mod.1 is the adaLN modulation
# Linear, routed per timestep group like the native model's condition-only adaLN LoRA; the text stream
# (add_*_proj, to_add_out, txt_*) is never adapted.
LORA_TARGETS = (
    r".*(img_in|transformer_blocks\.\d+\.(img_mod\.1|attn\.(to_q|to_k|to_v|to_out\.0)"
    r"|img_mlp\.net\.(0\.proj|2)))\.linear"
)
_ROUTED = {"img_mod.1": 0}  # module-name suffix -> axis holding the [noise ; cond] halves (default: 1, tokens)
# Modules outside the LoRA that only ever see the condition branch: trained in full beside it
COND_ONLY = ("t2_embedder.",)

# Tiny configs of the same diffusers classes, for tests and CPU smoke runs (seconds, not hours).
TINY_TRANSFORMER = dict(
    patch_size=2,
    in_channels=16,
    out_channels=4,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    axes_dims_rope=(4, 6, 6),
)
TINY_VAE = dict(
    base_dim=8,
    z_dim=4,
    dim_mult=[1, 1, 1, 1],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
    latents_mean=[0.1, -0.2, 0.3, 0.0],
    latents_std=[1.5, 0.8, 1.2, 2.0],
)
TINY_PROMPT_TOKENS = 5


@dataclass
class QwenTeasrConfig:
    patch_size: int = 2  # the pipelines' 2x2 latent packing: latent pixels per token side
    latent_channels: int = 16  # AutoencoderKLQwenImage z_dim
    cond_rope: str = "shared"  # "shared": condition tokens on the noise tokens' RoPE ids; "edit": on frame 1

    def to_dict(self) -> dict:
        return asdict(self)


class CondRouter(nn.Module):
    """A Linear whose input holds [noise ; cond] halves along `dim`; a LoRA on it reaches the cond half only.

    peft replaces `self.linear` by a LoRA layer exposing the frozen original as `.base_layer` (as does
    teasr's exported CondLoRALinear): the noise half goes through `base_layer`, the condition half through the
    adapted layer, so the noise branch computes exactly the frozen prior. A wrapper rather than a forward
    hook, because a hook could only subtract the delta back out of the noise tokens after computing it.
    The split is stateless (both halves always have the same size: the two token sets share one grid,
    and temb is [temb(t_cur) ; temb2(t_tar)]), so it also holds when gradient checkpointing re-runs a block.
    """

    def __init__(self, linear: nn.Module, dim: int = 1):
        super().__init__()
        self.linear, self.dim = linear, dim

    def forward(self, x):
        lin = self.linear
        if not hasattr(lin, "base_layer"):
            return lin(x)
        noise, cond = x.chunk(2, dim=self.dim)
        return torch.cat([lin.base_layer(noise), lin(cond)], dim=self.dim)


def _install_routers(transformer: nn.Module) -> None:
    pattern = re.compile(LORA_TARGETS.removesuffix(r"\.linear"))
    for name, mod in list(transformer.named_modules()):
        if isinstance(mod, nn.Linear) and pattern.fullmatch(name):
            parent, _, child = name.rpartition(".")
            dim = next((d for suffix, d in _ROUTED.items() if name.endswith(suffix)), 1)
            setattr(transformer.get_submodule(parent) if parent else transformer, child, CondRouter(mod, dim))


def _enable_per_token_modulation(transformer: nn.Module) -> None:
    """Two modulation groups in every block (diffusers' zero_cond_t), whatever the base config says."""
    cfg = transformer.config
    if cfg.get("use_additional_t_cond") or cfg.get("use_layer3d_rope") or cfg.get("guidance_embeds"):
        raise ModelError(
            "this Qwen-Image variant (layered RoPE / extra time or guidance embedding) is not supported; "
            "use the text-to-image transformer (Qwen/Qwen-Image or Qwen/Qwen-Image-2512)"
        )
    if not hasattr(transformer.transformer_blocks[0], "zero_cond_t"):
        raise ModelError(
            "diffusers is too old for the Qwen-Image backbone (needs per-token modulation); "
            "run: pip install 'diffusers>=0.37'"
        )
    transformer.zero_cond_t = True
    for block in transformer.transformer_blocks:
        block.zero_cond_t = True
    transformer.register_to_config(zero_cond_t=True)


def pack(z: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C*p*p), the Qwen-Image pipelines' latent packing."""
    B, C, H, W = z.shape
    z = z.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(B, (H // p) * (W // p), C * p * p)


def unpack(x: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    B, _, D = x.shape
    x = x.reshape(B, h, w, D // (p * p), p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, D // (p * p), h * p, w * p)


def _times(t, batch: int, device) -> torch.Tensor:
    # float32 on purpose: diffusers rounds t to the model dtype first, bf16 would blur neighbouring times
    t = torch.as_tensor(t, dtype=torch.float32, device=device)
    return t.expand(batch) if t.ndim == 0 else t


def _embed_time(embedder: nn.Module, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # QwenTimestepProjEmbeddings reads only the dtype of its `hidden_states` argument; the trainable
    # t2_embedder may be kept in float32 on a bf16 base, so give each embedder its own weight dtype.
    w_dtype = embedder.timestep_embedder.linear_1.weight.dtype
    return embedder(t, torch.empty(0, dtype=w_dtype, device=t.device)).to(dtype)


class QwenImageTeasr(nn.Module):
    """v = model(z_t, t_cur, z_lq, t_tar) on a diffusers QwenImageTransformer2DModel.

    Latents are (B, C, H, W) in the codec's normalised space ((z - latents_mean) / latents_std);
    times are floats or (B,) tensors in [-1, 1] (DESIGN.md section 1).
    `codec` (encode/decode, `downsample` = 8) is an attribute, not a submodule: it is moved, cast and
    offloaded separately (the 20B transformer and the VAE never need to share a device), and the model's
    state_dict holds only the DiT side.
    """

    def __init__(
        self,
        transformer: nn.Module,
        codec: nn.Module | None,
        prompt_embeds: torch.Tensor,
        cond_rope: str = "shared",
        base: dict | None = None,
    ):
        super().__init__()
        if cond_rope not in ("shared", "edit"):
            raise ValueError(f"cond_rope must be 'shared' or 'edit', not {cond_rope!r}")
        _enable_per_token_modulation(transformer)
        _install_routers(transformer)
        self.transformer = transformer
        self.t2_embedder = copy.deepcopy(transformer.time_text_embed)  # temb2 starts as a copy of temb
        self.register_buffer("prompt_embeds", prompt_embeds.reshape(1, -1, prompt_embeds.shape[-1]))
        tc = transformer.config
        self.config = QwenTeasrConfig(patch_size=tc.patch_size, latent_channels=tc.out_channels, cond_rope=cond_rope)
        object.__setattr__(self, "codec", codec)  # deliberately not registered (see the class docstring)
        self.base = dict(base or {})  # where the frozen base comes from (saved in config.json)
        self.lora: dict | None = None  # {"rank", "alpha"} once add_lora ran
        self.lora_target_modules = LORA_TARGETS
        self.gradient_checkpointing = False
        self.offload_mode = "none"

    def _rope(self, h: int, w: int, n_txt: int, device):
        pos = self.transformer.pos_embed
        if self.config.cond_rope == "shared":
            vid, txt = pos([[(1, h, w)]], max_txt_seq_len=n_txt, device=device)
            return torch.cat([vid, vid]), txt
        return pos([[(1, h, w), (1, h, w)]], max_txt_seq_len=n_txt, device=device)

    def forward(self, z_t, t_cur, z_lq, t_tar):
        """z_t, z_lq: (B, C, H, W) latents; t_cur, t_tar: floats or (B,). Returns v like z_t."""
        tr, p = self.transformer, self.config.patch_size
        B, _, H, W = z_t.shape
        ph, pw = (-H) % p, (-W) % p
        if ph or pw:  # odd sizes: pad to whole patches (replicate keeps borders natural), crop the output
            z_t = F.pad(z_t, (0, pw, 0, ph), mode="replicate")
            z_lq = F.pad(z_lq, (0, pw, 0, ph), mode="replicate")
        h, w = (H + ph) // p, (W + pw) // p
        n, dtype, dev = h * w, tr.img_in.linear.weight.dtype, z_t.device
        img = tr.img_in(torch.cat([pack(z_t, p), pack(z_lq, p)], dim=1).to(dtype))  # (B, 2n, D)
        txt = tr.txt_in(tr.txt_norm(self.prompt_embeds.to(dev, dtype).expand(B, -1, -1)))  # (B, L, D)
        temb = torch.cat(
            [
                _embed_time(tr.time_text_embed, _times(t_cur, B, dev), dtype),  # group 0: noise
                _embed_time(self.t2_embedder, _times(t_tar, B, dev), dtype),
            ]
        )  # group 1: cond
        index = torch.cat(
            [torch.zeros(n, dtype=torch.int, device=dev), torch.ones(n, dtype=torch.int, device=dev)]
        ).expand(B, -1)
        rope = self._rope(h, w, txt.shape[1], dev)
        for block in tr.transformer_blocks:
            args = (img, txt, None, temb, rope, None, index)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                txt, img = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
            else:
                txt, img = block(*args)
        out = tr.proj_out(tr.norm_out(img[:, :n], temb[:B]))  # only noise tokens carry the velocity
        return unpack(out, h, w, p)[:, :, :H, :W].to(z_t.dtype)


# ---------------------------------------------------------------------------------------------
# Building: tiny random configs (tests) and the real base from the Hub cache (GPU users)


def _diffusers():
    try:
        from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    except ImportError:
        raise ModelError("the qwen-image backbone needs diffusers: pip install 'teasr[qwen]'") from None
    return QwenImageTransformer2DModel, AutoencoderKLQwenImage


def _codec(vae: nn.Module, tiled: bool = True) -> nn.Module:
    return DiffusersAutoencoder(vae, tiled=tiled)


def build_tiny(seed: int = 0, cond_rope: str = "shared") -> QwenImageTeasr:
    """A tiny random QwenImageTransformer2DModel + AutoencoderKLQwenImage (same classes as the 20B model)."""
    Transformer, Vae = _diffusers()
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream alone
        torch.manual_seed(seed)
        tr = Transformer(**TINY_TRANSFORMER)
        vae = Vae(**TINY_VAE)
        prompt = torch.randn(1, TINY_PROMPT_TOKENS, TINY_TRANSFORMER["joint_attention_dim"])
    base = {"tiny": True, "transformer": _plain_config(tr), "vae": _plain_config(vae)}
    return QwenImageTeasr(tr, _codec(vae), prompt, cond_rope=cond_rope, base=base).eval()


def _plain_config(module: nn.Module) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in module.config.items() if not k.startswith("_")}


def _snapshot(repo_id: str, revision: str, patterns: list[str]) -> Path:
    """Local snapshot folder (its name is the commit sha) from the Hub cache, downloading what is missing."""
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:  # HfHubHTTPError, LocalEntryNotFoundError, OSError...: all mean "cannot get the base"
        raise ModelError(
            f"cannot get the Qwen-Image base {repo_id}@{revision} ({type(e).__name__}); "
            "connect to the Hugging Face Hub once (or set HF_HUB_OFFLINE=0) to fill the cache"
        ) from None


def encode_empty_prompt(folder, device="cpu", dtype=torch.bfloat16) -> torch.Tensor:
    """The base pipeline's embedding of the empty prompt, (1, L, 3584), with diffusers' own template handling.

    Runs the Qwen2.5-VL text encoder once; the result is stored with the model so that inference never does.
    """
    from diffusers import QwenImagePipeline
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(folder, subfolder="tokenizer")
    enc = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, subfolder="text_encoder", dtype=dtype).to(device)
    pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=enc, tokenizer=tok, transformer=None)
    with torch.no_grad():
        emb, mask = pipe.encode_prompt("", device=torch.device(device))
    if mask is not None:  # one prompt has no padding; anything else means the template handling changed
        raise ModelError("unexpected padded empty-prompt embedding from the Qwen-Image text encoder")
    return emb[:1].float().cpu()


def from_base(
    repo_id: str = QWEN_IMAGE_BASE[0],
    revision: str = QWEN_IMAGE_BASE[1],
    dtype=torch.bfloat16,
    prompt_embeds: torch.Tensor | None = None,
    device=None,
    cond_rope: str = "shared",
    vae_tiling: bool = True,
) -> QwenImageTeasr:
    """The real Qwen-Image transformer + VAE from the Hub cache (downloaded on first use).

    Without `prompt_embeds`, the empty-prompt embedding is computed once with the base's text encoder
    (about 16 GB more to download, and a GPU-sized forward). bf16 is the sensible dtype (fp16 works but
    Qwen-Image's activations need diffusers' fp16 clipping); float32 needs ~82 GB of memory.
    """
    Transformer, Vae = _diffusers()
    if revision == QWEN_IMAGE_REVISION_PLACEHOLDER:
        warnings.warn(
            f"the Qwen-Image base revision is not pinned ({repo_id}@{revision}); the commit actually "
            "loaded is recorded in saved models",
            stacklevel=2,
        )
    patterns = ["transformer/*", "vae/*"] + ([] if prompt_embeds is not None else ["text_encoder/*", "tokenizer/*"])
    folder = _snapshot(repo_id, revision, patterns)
    try:
        tr = Transformer.from_pretrained(folder, subfolder="transformer", torch_dtype=dtype)
        vae = Vae.from_pretrained(folder, subfolder="vae", torch_dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the Qwen-Image base from {folder}: {e}") from None
    if prompt_embeds is None:
        prompt_embeds = encode_empty_prompt(folder, device or ("cuda" if torch.cuda.is_available() else "cpu"), dtype)
    model = QwenImageTeasr(
        tr,
        _codec(vae, vae_tiling),
        prompt_embeds.to(dtype),
        cond_rope=cond_rope,
        base={"repo_id": repo_id, "revision": folder.name},
    )  # the snapshot folder is the commit sha
    if device is not None:
        model.to(device)
        model.codec.to(device)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# LoRA on the condition branch


def add_lora(model: QwenImageTeasr, rank: int = 128, alpha: float = 128, dropout: float = 0.0) -> None:
    """Freeze the model, add peft LoRA to the routed image-stream Linears; train LoRA + t2_embedder.

    Trainable weights are float32 (peft does so for the adapters; t2_embedder is upcast here), the
    frozen base keeps its dtype: AdamW on bf16 weights would lose the small updates.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if model.lora is not None:
        raise ModelError("this model already has a LoRA; load the base again to start a new one")
    model.requires_grad_(False)
    inject_adapter_in_model(
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=model.lora_target_modules, lora_dropout=dropout),
        model.transformer,
    )
    model.t2_embedder.float()
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or name.startswith(COND_ONLY))
    model.lora = {"rank": rank, "alpha": alpha}


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a teasr Qwen-Image model adds to its base: LoRA, the second time embedder, the prompt embedding."""
    return {
        k: v for k, v in model.state_dict().items() if "lora_" in k or k.startswith(COND_ONLY) or k == "prompt_embeds"
    }


# ---------------------------------------------------------------------------------------------
# Model folders (folders.py): config.json names the base (Hub repo + commit, or a tiny random config) and the
# LoRA; model.safetensors holds trainable_state (plus the whole model when the base is tiny, which no Hub has)


class QwenImageBackbone(Backbone):
    name = "qwen-image"

    def build(self, config: dict, state: dict | None = None, dtype: torch.dtype | None = None) -> QwenImageTeasr:
        """The base from config["base"] (the Hub cache, bf16 by default; or tiny) with the LoRA the config names.
        A new model (no state) gets its prompt embedding from the base's text encoder, a tiny one from its seed."""
        base, lora = config.get("base") or {}, config.get("lora")
        rope = (config.get("model") or {}).get("cond_rope", "shared")
        if state is not None and "prompt_embeds" not in state:
            raise ModelError("model.safetensors has no prompt embedding: not a teasr qwen-image model")
        prompt = None if state is None else state["prompt_embeds"]
        if base.get("tiny") and prompt is None:
            model = build_tiny(base.get("seed", 0), rope)
        elif base.get("tiny"):  # random weights of the right shapes: load_pretrained fills them in
            Transformer, Vae = _diffusers()
            model = QwenImageTeasr(
                Transformer.from_config(base["transformer"]),
                _codec(Vae.from_config(base["vae"])),
                prompt,
                cond_rope=rope,
                base=base,
            )
        elif base.get("repo_id") and base.get("revision"):
            model = from_base(base["repo_id"], base["revision"], dtype or torch.bfloat16, prompt, cond_rope=rope)
        else:
            raise ModelError("config.json names no Qwen-Image base (expected base.repo_id and base.revision)")
        if lora:
            add_lora(model, lora["rank"], lora["alpha"])
        return model

    def new_config(self, train) -> dict:
        if train.base == "tiny":
            base = {"tiny": True, "seed": train.seed}
        else:
            repo, rev = parse_repo_spec(train.base)
            base = {"repo_id": repo, "revision": rev or QWEN_IMAGE_BASE[1]}
        return {"backbone": self.name, "scale": train.scale, "base": base}

    def check(self, train) -> None:
        if train.stage != "sad":
            raise TeasrError("qwen-image is already a generative prior: train it with --stage sad")

    def add_cond_lora(self, model: QwenImageTeasr, rank: int, alpha: float) -> None:
        if model.lora is None:  # a loaded folder's LoRA is already in place and trainable: it continues as it is
            add_lora(model, rank, alpha)

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return trainable_state(model)

    def folder_state(self, model: QwenImageTeasr) -> dict[str, torch.Tensor]:
        if model.offload_mode == "sequential":
            raise TeasrError(
                "save the model before enable_offload(..., 'sequential'): its weights are on the meta device"
            )
        if not model.base.get("tiny"):
            return trainable_state(model)
        return {**model.state_dict(), **{f"codec.vae.{k}": v for k, v in model.codec.vae.state_dict().items()}}

    def folder_config(self, model: QwenImageTeasr, config: dict) -> dict:
        return {"scale": 4, **config, "base": model.base, "lora": model.lora, "model": model.config.to_dict()}

    def weights_dtype(self, mixed_precision: str) -> torch.dtype:
        return torch.bfloat16 if mixed_precision == "bf16" else torch.float32  # the 20B base is frozen: no fp32 copy

    def export(
        self,
        model: QwenImageTeasr,
        config: dict,
        folder,
        ema: dict | None = None,
        lora_rank: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> Path:
        """The LoRA stays peft's, as trained; EMA weights are swapped in and back, not deep-copied (20B)."""
        if lora_rank is not None:
            raise TeasrError("--lora-rank applies to native models; a qwen-image folder keeps its peft LoRA as trained")
        params = dict(model.named_parameters())
        live = {n: params[n].detach().clone() for n in (ema or {})}
        with torch.no_grad():
            for n, v in (ema or {}).items():
                params[n].copy_(v)
            try:
                return save_pretrained(model, config, folder, dtype)
            finally:
                for n, v in live.items():
                    params[n].copy_(v)


BACKBONE = QwenImageBackbone()


# ---------------------------------------------------------------------------------------------
# Big-model inference: CPU offload (accelerate hooks)


def enable_offload(model: QwenImageTeasr, mode: str = "none", device="cuda") -> None:
    """Where the weights live between calls; cast the dtype before this (hooks pin module placement).

    none:       DiT and VAE resident on `device`.
    model:      each of DiT and VAE moves to `device` when called and sends the other back to the CPU
                (peak = the DiT, ~41 GB in bf16); a few seconds of PCIe transfer per call.
    sequential: every leaf module's weights stay on the CPU and stream in per call (peak ~ one block,
                a few GB); slow, for GPUs smaller than the model. Inputs may live on `device`.
    """
    try:
        from accelerate import cpu_offload, cpu_offload_with_hook
        from accelerate.hooks import remove_hook_from_module
    except ImportError:
        raise ModelError("offloading needs accelerate: pip install accelerate") from None
    if mode not in OFFLOAD_MODES:
        raise TeasrError(f"unknown offload mode {mode!r}; use one of {', '.join(OFFLOAD_MODES)}")
    vae = model.codec.vae
    for m in (model, vae):
        remove_hook_from_module(m, recurse=True)  # restores sequentially offloaded weights too
    model.codec.to(device)  # the codec's normalisation buffers stay with the latents
    if mode == "none":
        model.to(device)
    elif mode == "model":
        _, dit_hook = cpu_offload_with_hook(model, device)
        _, vae_hook = cpu_offload_with_hook(vae, device, prev_module_hook=dit_hook)
        dit_hook.hook.prev_module_hook = vae_hook  # each one evicts the other: at most one resident
    else:
        cpu_offload(model, device)
        cpu_offload(vae, device)
    model.offload_mode = mode

"""Native dual-branch DiT with Decoupled Timestep Condition (DESIGN.md section 2).

    z_t  --patchify--> noise tokens  (adaLN from t_embedder(t_cur))
    z_lq --patchify--> cond tokens   (adaLN from t2_embedder(t_tar))
    [noise ; cond] --> depth x joint-attention DiT blocks --> noise tokens --> final_layer --> v

Both token sets share one grid (same 2-D RoPE positions), so attention is spatially aligned,
and RoPE carries no absolute position, which keeps the model translation-equivariant (tiles
of an image see the same function as the whole image).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class DiTConfig:
    latent_channels: int = 48  # channels of the codec latent (pixel-unshuffle f=4 on RGB: 3*4*4)
    patch_size: int = 2  # latent pixels per token side
    hidden_size: int = 256
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 4.0
    rope_theta: float = 100.0  # grids are small (tiles), a short base wavelength suits them
    # What the final layer predicts. "v": the velocity itself (DESIGN default). "x0": a clean latent as a
    # residual on the LQ latent, x0 = z_lq + out, returned as v = (z_t - x0) / max(t_cur, t_min). Needed when a
    # patch holds more values than a token (16x16 RGB pixels = 768 > width): noise cannot pass through such a
    # bottleneck, clean images can (JiT, "Back to Basics: Let Denoising Generative Models Denoise").
    prediction: str = "v"
    t_min: float = 0.05
    # A small residual CNN after the unpatchify (0 = none). With 4x4 patches on an f=4 latent one token
    # is 16x16 pixels, emitted by one linear map: the token grid shows. 3x3 convs at latent resolution see
    # across token borders and the LQ latent at full resolution; zero-initialised, so adding it to a trained
    # prior changes nothing until it is trained.
    head_channels: int = 0
    head_depth: int = 2
    # Hybrid form (trunk_channels > 0; DESIGN section 2, issue 18). On a CPU quality per FLOP comes from 3x3 convs
    # at latent (= LR) resolution, so conv trunks do the local work and the DiT over coarse tokens adds global
    # context: a residual conv body on the condition latent (FiLM from t_tar), a stem on the noise latent (FiLM
    # from t_cur), the dual-branch DiT over patches of their features, and a conv decoder with skips from both
    # (FiLM from t_cur). depth = 0 leaves the DiT out: the conv-only control of the equal-compute study.
    trunk_channels: int = 0
    trunk_depth: int = 8
    stem_depth: int = 1
    decoder_depth: int = 2
    cond_lora_rank: int = 0  # > 0: exported condition-branch LoRA (plain modules, no peft needed)
    cond_lora_alpha: float = 0.0

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown DiT config fields: {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def branch_linear(lin: nn.Module, x: torch.Tensor, n_noise: int) -> torch.Tensor:
    """Apply `lin` to [noise ; cond] tokens so that a LoRA on `lin` reaches condition tokens only.

    peft wraps a LoRA'd Linear and exposes the frozen original as `.base_layer`: noise tokens go
    through the base weight, condition tokens through base + B A (the noise branch stays the frozen prior).
    """
    if hasattr(lin, "base_layer"):
        return torch.cat([lin.base_layer(x[:, :n_noise]), lin(x[:, n_noise:])], dim=1)
    return lin(x)


# Linears that the condition branch may adapt (peft LoRA in training, CondLoRALinear after export)
LORA_TARGETS = r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2)|adaLN_modulation\.1)"


class CondLoRALinear(nn.Module):
    """An exported condition-branch LoRA: `base_layer` alone for noise tokens, base + up(down(x)) * scale for
    condition tokens. Same `.base_layer` convention as peft, so `branch_linear` treats both alike.

    The delta is kept low-rank rather than merged into the weight, because the weight is shared with the
    noise branch: a merge would change the frozen prior too.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base_layer = base
        self.lora_down = nn.Linear(base.in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.lora_up.weight)
        self.scale = alpha / rank

    def forward(self, x):
        return self.base_layer(x) + self.lora_up(self.lora_down(x)) * self.scale


def add_cond_lora(model: nn.Module, rank: int, alpha: float) -> nn.Module:
    """Replace every LORA_TARGETS linear by a CondLoRALinear (in place)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and re.fullmatch(LORA_TARGETS, name):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, CondLoRALinear(mod, rank, alpha))
    return model


class TimestepEmbedder(nn.Module):
    """Embeds scalar times in [-1, 1]; the x1000 scaling lives only here (DESIGN section 1)."""

    def __init__(self, hidden_size: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        # float32 sinusoid, as in DiT: low precision here would blur neighbouring times
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = (t.float() * 1000)[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t):
        emb = self.timestep_embedding(t, self.freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


def rope_2d(h: int, w: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (h*w, head_dim/2) of axial 2-D rotary embeddings: half the pairs rotate with y, half with x."""
    quarter = head_dim // 4
    freqs = 1.0 / theta ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter)
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float32),
        torch.arange(w, device=device, dtype=torch.float32),
        indexing="ij",
    )
    ang = torch.cat([ys.reshape(-1, 1) * freqs, xs.reshape(-1, 1) * freqs], dim=1)  # (h*w, head_dim/2)
    return ang.cos(), ang.sin()


def apply_rope(x, cos, sin):
    # x: (B, heads, L, head_dim) with pairs interleaved as (even, odd)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = nn.RMSNorm(dim // num_heads, eps=1e-6)  # QK-norm keeps attention logits tame at any resolution
        self.k_norm = nn.RMSNorm(dim // num_heads, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cos, sin, n_noise, n_out=None):
        """Joint attention; with `n_out`, only the first n_out tokens query (the others still give keys/values)."""
        B, L, D = x.shape
        qkv = branch_linear(self.qkv, x, n_noise).reshape(B, L, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, heads, L, head_dim) each
        q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        n_out = L if n_out is None else n_out
        x = F.scaled_dot_product_attention(q[:, :, :n_out], k, v)  # joint attention over both branches
        return branch_linear(self.proj, x.transpose(1, 2).reshape(B, n_out, D), n_noise)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x, n_noise):
        return branch_linear(self.fc2, F.gelu(branch_linear(self.fc1, x, n_noise), approximate="tanh"), n_noise)


class DiTBlock(nn.Module):
    """adaLN-Zero DiT block with per-branch modulation: noise tokens by c_noise, condition tokens by c_cond."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def modulation(self, c_noise, c_cond, n_noise, n_cond):
        """Per-token (shift, scale, gate) x 2, each (B, L, D): the two times never mix in one embedding."""
        lin = self.adaLN_modulation[1]
        base = getattr(lin, "base_layer", lin)  # a condition-branch LoRA must not touch the noise tokens' modulation
        mods = [base(F.silu(c_noise)).unsqueeze(1), lin(F.silu(c_cond)).unsqueeze(1)]
        per_tok = torch.cat([mods[0].expand(-1, n_noise, -1), mods[1].expand(-1, n_cond, -1)], dim=1)
        return per_tok.chunk(6, dim=-1)

    def forward(self, x, c_noise, c_cond, cos, sin, n_noise, last=False):
        """`last`: only the noise tokens come out, since nothing reads the condition tokens after the last block
        (as SD3's context_pre_only): their attention queries, projection and MLP would be dead work."""
        sh1, sc1, g1, sh2, sc2, g2 = self.modulation(c_noise, c_cond, n_noise, x.shape[1] - n_noise)
        n = n_noise if last else x.shape[1]
        x = x[:, :n] + g1[:, :n] * self.attn(self.norm1(x) * (1 + sc1) + sh1, cos, sin, n_noise, n)
        x = x + g2[:, :n] * self.mlp(self.norm2(x) * (1 + sc2[:, :n]) + sh2[:, :n], n_noise)
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class ConvHead(nn.Module):
    """out + CNN([out, z_t, z_lq]), its features modulated by the noise-branch time (FiLM)."""

    def __init__(self, channels: int, width: int, depth: int, cond_dim: int):
        super().__init__()
        conv = lambda i, o: nn.Conv2d(i, o, 3, padding=1, padding_mode="replicate")  # noqa: E731 (replicate: tile borders)
        self.inp = conv(3 * channels, width)
        self.mid = nn.ModuleList(conv(width, width) for _ in range(depth))
        self.film = nn.Linear(cond_dim, 2 * width)
        self.out = conv(width, channels)

    def zero_init(self):
        for m in (self.film, self.out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, out, z_t, z_lq, c):
        h = self.inp(torch.cat([out, z_t, z_lq], dim=1))
        shift, scale = self.film(F.silu(c))[:, :, None, None].chunk(2, dim=1)
        h = h * (1 + scale) + shift
        for conv in self.mid:
            h = h + conv(F.gelu(h))
        return out + self.out(F.gelu(h))


def conv3x3(i: int, o: int) -> nn.Conv2d:
    return nn.Conv2d(i, o, 3, padding=1, padding_mode="replicate")  # replicate: a tile border looks like an image's


class FiLMResBlock(nn.Module):
    """h + conv(gelu(FiLM(conv(h)))), FiLM from one time embedding: the conv-feature form of adaLN."""

    def __init__(self, width: int, cond_dim: int):
        super().__init__()
        self.conv1, self.conv2 = conv3x3(width, width), conv3x3(width, width)
        self.film = nn.Linear(cond_dim, 2 * width)  # zero-initialised: starts unmodulated

    def forward(self, h, c):
        shift, scale = self.film(F.silu(c))[:, :, None, None].chunk(2, dim=1)
        return h + self.conv2(F.gelu(self.conv1(h) * (1 + scale) + shift))


class ConvTrunk(nn.Module):
    """conv in -> `depth` FiLM residual blocks, all at latent resolution, modulated by one time."""

    def __init__(self, in_ch: int, width: int, depth: int, cond_dim: int):
        super().__init__()
        self.inp = conv3x3(in_ch, width)
        self.blocks = nn.ModuleList(FiLMResBlock(width, cond_dim) for _ in range(depth))

    def forward(self, x, c):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, c)
        return h


class TeasrDiT(nn.Module):
    """v = model(z_t, t_cur, z_lq, t_tar): velocity (eps - z0) for latents of any size."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = c = config
        assert c.hidden_size % c.num_heads == 0 and (c.hidden_size // c.num_heads) % 4 == 0, (
            "head_dim must be a multiple of 4 (2-D RoPE)"
        )
        assert c.depth or c.trunk_channels, "a model needs DiT blocks (depth) or conv trunks (trunk_channels)"
        assert c.prediction in ("v", "x0"), f"prediction must be 'v' or 'x0', not {c.prediction!r}"
        width = c.trunk_channels or c.latent_channels  # what the tokens are patches of
        patch_dim = width * c.patch_size**2
        # (registration order fixes the initialisation's random draws: keep it)
        if c.depth:
            self.x_embedder = nn.Linear(patch_dim, c.hidden_size)  # noise branch input
            self.c_embedder = nn.Linear(patch_dim, c.hidden_size)  # condition branch input
        self.t_embedder = TimestepEmbedder(c.hidden_size)  # t_cur -> noise-path modulation
        self.t2_embedder = TimestepEmbedder(c.hidden_size)  # t_tar -> condition-path modulation
        if c.depth:
            self.blocks = nn.ModuleList([DiTBlock(c.hidden_size, c.num_heads, c.mlp_ratio) for _ in range(c.depth)])
            self.final_layer = FinalLayer(c.hidden_size, patch_dim)
        if c.trunk_channels:
            self.trunk = ConvTrunk(c.latent_channels, width, c.trunk_depth, c.hidden_size)  # condition path
            self.stem = ConvTrunk(c.latent_channels, width, c.stem_depth, c.hidden_size)  # noise path
            self.decoder = ConvTrunk((3 if c.depth else 2) * width, width, c.decoder_depth, c.hidden_size)
            self.decoder_out = conv3x3(width, c.latent_channels)
        self.head = (
            ConvHead(c.latent_channels, c.head_channels, c.head_depth, c.hidden_size) if c.head_channels else None
        )
        self.gradient_checkpointing = False
        self.initialize_weights()
        if c.cond_lora_rank > 0:
            add_cond_lora(self, c.cond_lora_rank, c.cond_lora_alpha or c.cond_lora_rank)

    def initialize_weights(self):
        def _basic_init(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(_basic_init)
        for emb in (self.t_embedder, self.t2_embedder):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        self.t2_embedder.load_state_dict(self.t_embedder.state_dict())  # temb2 starts as a copy of temb
        # adaLN-Zero: every block starts as the identity and the model outputs zero velocity
        # adaLN-Zero for the DiT blocks, and its conv-feature twin: every FiLM starts unmodulated
        zero = [b.adaLN_modulation[-1] for b in getattr(self, "blocks", [])]
        zero += [m.film for m in self.modules() if isinstance(m, FiLMResBlock)]
        if self.config.depth:
            zero += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        if self.config.trunk_channels:
            zero.append(self.decoder_out)  # the hybrid starts as the bicubic latent (x0) or zero velocity (v)
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if self.head is not None:
            self.head.zero_init()

    def patchify(self, z):
        p = self.config.patch_size
        B, C, H, W = z.shape
        z = z.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
        return z.reshape(B, (H // p) * (W // p), C * p * p)

    def unpatchify(self, x, h, w):
        p, C = self.config.patch_size, self.config.trunk_channels or self.config.latent_channels
        x = x.reshape(x.shape[0], h, w, C, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(x.shape[0], C, h * p, w * p)

    @staticmethod
    def _times(t, batch, device):
        t = torch.as_tensor(t, dtype=torch.float32, device=device)
        return t.expand(batch) if t.ndim == 0 else t

    def forward(self, z_t, t_cur, z_lq, t_tar):
        """z_t, z_lq: (B, C, H, W) latents; t_cur, t_tar: floats or (B,) in [-1, 1]. Returns v like z_t."""
        B, _, H, W = z_t.shape
        p = self.config.patch_size
        ph, pw = (-H) % p, (-W) % p
        if ph or pw:  # odd sizes: pad to whole patches (replicate keeps borders natural), crop the output
            z_t = F.pad(z_t, (0, pw, 0, ph), mode="replicate")
            z_lq = F.pad(z_lq, (0, pw, 0, ph), mode="replicate")
        h, w = (H + ph) // p, (W + pw) // p
        c_noise = self.t_embedder(self._times(t_cur, B, z_t.device))  # (B, D)
        c_cond = self.t2_embedder(self._times(t_tar, B, z_t.device))  # (B, D)
        if self.config.trunk_channels:
            f_t, f_lq = self.stem(z_t, c_noise), self.trunk(z_lq, c_cond)  # (B, width, H', W') each
            skips = [f_t, f_lq]
            if self.config.depth:
                skips.insert(0, self.tokens(f_t, f_lq, c_noise, c_cond, h, w))
            out = self.decoder_out(F.gelu(self.decoder(torch.cat(skips, dim=1), c_noise)))
        else:
            out = self.tokens(z_t, z_lq, c_noise, c_cond, h, w)
        if self.head is not None:
            out = self.head(out, z_t, z_lq, c_noise)
        out = out[:, :, :H, :W]
        if self.config.prediction == "x0":
            t_c, t_t = self._times(t_cur, B, z_t.device), self._times(t_tar, B, z_t.device)
            # a jump (|t_tar| < t_cur) divides by t_cur itself, so an Euler step lands exactly on the predicted x0
            # at any step count (steps below t_min come with N > 1/t_min). Training keeps the clamp: its loss
            # targets must stay bounded as t -> 0.
            t = t_c.clamp(min=self.config.t_min)
            if not self.training:
                t = torch.where(t_t.abs() < t_c, t_c, t)
            return (z_t[:, :, :H, :W] - (z_lq[:, :, :H, :W] + out)) / t.view(-1, 1, 1, 1)
        return out

    def tokens(self, x_t, x_lq, c_noise, c_cond, h, w):
        """The dual-branch DiT on (h, w) patches of noise-path and condition-path maps; returns the noise-path map."""
        n = h * w
        x = torch.cat([self.x_embedder(self.patchify(x_t)), self.c_embedder(self.patchify(x_lq))], dim=1)  # (B, 2n, D)
        cos, sin = rope_2d(h, w, self.config.hidden_size // self.config.num_heads, self.config.rope_theta, x.device)
        cos, sin = (
            cos.repeat(2, 1).to(x.dtype),
            sin.repeat(2, 1).to(x.dtype),
        )  # condition tokens reuse the noise positions
        for i, block in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, c_noise, c_cond, cos, sin, n, last, use_reentrant=False)
            else:
                x = block(x, c_noise, c_cond, cos, sin, n, last)
        return self.unpatchify(self.final_layer(x, c_noise), h, w)  # the noise tokens carry the output

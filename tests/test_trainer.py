"""Training (teasr_cli/trainer.py, lora.py): recipes, condition-branch LoRA, export, accumulation, resume,
data determinism, a short real run, the CLI, and a 2-process CPU DDP run. Tiny models, real photos."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from skimage import data as skdata
from typer.testing import CliRunner

from teasr_cli.data import HQImages, list_images
from teasr_cli.degrade import bicubic_lq
from teasr_cli.errors import TeasrError
from teasr_cli.folders import load_pretrained, model_config, save_pretrained
from teasr_cli.model import CondLoRALinear, DiTConfig, TeasrDiT
from teasr_cli.sad import SADConfig, draw_sample, sad_losses
from teasr_cli.trainer import (
    TrainConfig,
    build_model,
    export_checkpoint,
    export_model,
    latest_checkpoint,
    make_batch,
    pick_degradation,
    stage_sad_config,
    train,
)

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=32, depth=1, num_heads=2, patch_size=2)
CODEC = {"type": "pixel-unshuffle", "factor": 4, "scale": 1.0}
FAST = dict(degradation="bicubic", lpips="", threads=1, sample_every=0, log_every=1, seed=0)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder of three real photos (astronaut 512x512, chelsea 451x300, coffee 600x400)."""
    root = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "chelsea", "coffee"):
        Image.fromarray(getattr(skdata, name)()).save(root / f"{name}.png")
    return root


@pytest.fixture(scope="module")
def prior_dir(tmp_path_factory):
    """A saved tiny 2-block prior with seeded non-zero weights (adaLN-Zero would make a fresh model output 0)."""
    torch.manual_seed(0)
    model = TeasrDiT(DiTConfig(**{**TINY, "depth": 2}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("prior")
    save_pretrained(model, model_config(model.config, CODEC), folder)
    return folder


def tiny_cfg(photos, out, **kw) -> TrainConfig:
    return TrainConfig.load(
        None, **{"data": str(photos), "out": str(out), "model": dict(TINY), "crop": 32, "stage": "prior", **FAST, **kw}
    )


def randomize_lora(model, seed=1, std=0.1):
    """peft initialises lora_B to zero (a no-op adapter); make every LoRA factor non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def trainable_weights(run: Path, step: int) -> dict:
    return load_file(run / f"ckpt-{step:07d}" / "trainable.safetensors")


def assert_same(a: dict, b: dict, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


# ----------------------------------------------------------------------------- TrainConfig

RECIPE = """
model = { patch_size = 2, hidden_size = 32, depth = 1, num_heads = 2 }
crop = 64
lr = 1e-4
betas = [0.9, 0.95]
[stages.prior]
steps = 100
lr = 3e-4
[stages.sad]
steps = 7
lora_rank = 8
[sad]
lambda_adv = 0.5
tar_w_max = 5.0
"""


def test_config_recipe_stage_tables_and_overrides(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE)
    prior = TrainConfig.load(str(recipe), stage="prior", data="d")
    assert (prior.steps, prior.lr, prior.crop, prior.betas, prior.lora_rank) == (100, 3e-4, 64, (0.9, 0.95), 128)
    assert prior.model == dict(TINY) and prior.sad.lambda_adv == 0.5 and prior.sad.tar_w_max == 5.0
    sad = TrainConfig.load(str(recipe), stage="sad", init="prior/", data="d")
    assert (sad.steps, sad.lr, sad.lora_rank) == (7, 1e-4, 8)  # no lr in [stages.sad]: the flat one
    # command-line values win over the flat keys and over the stage table; None means "not given"
    cli = TrainConfig.load(str(recipe), stage="prior", steps=3, lr=1e-3, crop=None, sad={"lambda_adv": 2.0})
    assert (cli.steps, cli.lr, cli.crop, cli.sad.lambda_adv, cli.sad.tar_w_max) == (3, 1e-3, 64, 2.0, 5.0)
    # a saved train_config.json round-trips (that is how --resume and --export rebuild a run)
    again = TrainConfig.load(None, **json.loads(json.dumps(sad.to_dict())))
    assert again == sad


@pytest.mark.parametrize(
    "text, kw, words",
    [
        ("lr = 1e-4\nlearning_rate = 1\n", {}, "learning_rate"),
        ("[sad]\nlambda_gan = 1\n", {}, "sad.lambda_gan"),
        ("[stages.prior]\nstep = 5\n", {}, "step"),
        ("", {"stage": "sad"}, "--init"),
        ("", {"stage": "distil"}, "prior, sad or regress"),
        ("crop = 100\n", {}, "multiple of 32"),
        ("lr = \n", {}, "cannot read recipe"),
        ('lr_schedule = "cosine"\n', {}, "constant or linear"),
        ("lora_lr = -1e-4\n", {}, "lora_lr"),
        ("[sad]\nlast_steps = [4, 0]\n", {}, "sad.last_steps"),
    ],
)
def test_config_errors_are_one_line_teasr_errors(tmp_path, text, kw, words):
    recipe = tmp_path / "r.toml"
    recipe.write_text(text)
    with pytest.raises(TeasrError) as e:
        TrainConfig.load(str(recipe), **kw)
    assert words in str(e.value) and "\n" not in str(e.value).strip()


def test_shipped_recipe_loads_for_every_stage():
    recipe = ROOT / "train" / "tiny-cpu.toml"
    prior = TrainConfig.load(str(recipe), stage="prior", data="d")
    sad = TrainConfig.load(str(recipe), stage="sad", init="m", data="d")
    regress = TrainConfig.load(str(recipe), stage="regress", data="d")
    assert prior.ema > 0 and sad.ema < prior.ema and sad.lora_rank == 32 and prior.steps != sad.steps
    assert regress.lpips == "alex" and regress.model == prior.model and regress.crop == prior.crop


def test_prior_and_regress_stages_keep_only_their_own_term():
    """Every SAD weight on in the recipe: stage prior trains flow matching alone, regress the pixel anchor alone."""
    on = {f"lambda_{k}": 2.0 for k in ("flow", "cons", "data", "adv", "rect", "last")}

    def terms(stage):
        sad = stage_sad_config(TrainConfig.load(None, stage=stage, init="m", data="d", sad=on))
        return {k: getattr(sad, k) for k in on if getattr(sad, k) > 0}

    assert terms("prior") == {"lambda_flow": 2.0}
    assert terms("regress") == {"lambda_data": 1.0}
    assert terms("sad") == on


# ----------------------------------------------------------------------------- condition-branch LoRA


def sad_model(prior_dir, **kw):
    cfg = TrainConfig.load(
        None, **{"stage": "sad", "init": str(prior_dir), "data": "d", "lora_rank": 4, "lora_alpha": 8, "crop": 32, **kw}
    )
    return build_model(cfg)


def test_lora_stage_trains_only_lora_and_condition_modules(prior_dir):
    model, _ = sad_model(prior_dir)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith(("c_embedder.", "t2_embedder.")) for n in trainable)
    # every LORA_TARGETS linear of every block carries a LoRA, nothing else does
    lora_mods = {n.rsplit(".lora_", 1)[0] for n in trainable if "lora_" in n}
    targets = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")
    assert lora_mods == {f"blocks.{b}.{m}" for b in (0, 1) for m in targets}
    assert model.training  # load_pretrained gives eval(); gradient checkpointing runs in training mode only

    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    z0, zl = torch.randn(2, 48, 8, 8, generator=g), torch.randn(2, 48, 8, 8, generator=g)
    draws = [draw_sample((48, 8, 8), SADConfig(), g) for _ in range(2)]
    draws = {k: torch.stack([d[k] for d in draws]) for k in draws[0]}
    for _ in range(3):
        loss = sad_losses(
            model,
            z0,
            zl,
            draws,
            SADConfig(),
            decode=lambda z: torch.pixel_shuffle(z, 4),
            x0=torch.pixel_shuffle(z0, 4).clamp(-1, 1),
        )["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # Only noise tokens reach the output, so in the last block the condition tokens' attention output and MLP
    # are dead ends: those LoRAs get exactly zero gradient (and, starting from B = 0, never move).
    dead = {n for n in names_of(model) if n.startswith(("blocks.1.attn.proj.lora", "blocks.1.mlp.fc"))}
    assert len(dead) == 6
    assert changed == names_of(model) - dead  # every other trainable tensor moved, no frozen one did


def test_gradient_checkpointing_engages_and_gives_the_same_gradients(prior_dir):
    grads, saved = [], []
    for ckpt in (False, True):
        model = randomize_lora(sad_model(prior_dir, gradient_checkpointing=ckpt)[0])
        g = torch.Generator().manual_seed(0)
        z0, zl = torch.randn(2, 48, 8, 8, generator=g), torch.randn(2, 48, 8, 8, generator=g)
        draws = [draw_sample((48, 8, 8), SADConfig(), g) for _ in range(2)]
        draws = {k: torch.stack([d[k] for d in draws]) for k in draws[0]}
        n = [0]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: n.__setitem__(0, n[0] + t.numel()) or t, lambda t: t):
            loss = sad_losses(model, z0, zl, draws, SADConfig(lambda_data=0.0))["loss"]
        loss.backward()
        grads.append({k: p.grad for k, p in model.named_parameters() if p.requires_grad})
        saved.append(n[0])
    assert saved[1] < saved[0] / 2  # checkpointing really ran (the model is in training mode)
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-7, msg=k)


def names_of(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _first_block_qk(model, z, zl, t, s):
    """q and k rows (all tokens) entering the first block's QK-norm."""
    seen = {}
    hooks = [
        getattr(model.blocks[0].attn, k).register_forward_hook(lambda m, a, o, k=k: seen.setdefault(k, a[0]))
        for k in ("q_norm", "k_norm")
    ]
    with torch.no_grad():
        model(z, t, zl, s)
    for h in hooks:
        h.remove()
    return seen["q_norm"], seen["k_norm"]


def test_lora_reaches_condition_tokens_only(prior_dir):
    base, _ = load_pretrained(prior_dir)
    lora = randomize_lora(sad_model(prior_dir)[0])
    g = torch.Generator().manual_seed(0)
    z, zl = torch.randn(2, 48, 8, 8, generator=g), torch.randn(2, 48, 8, 8, generator=g)
    t, s = torch.tensor([0.7, 0.2]), torch.tensor([0.3, 0.0])
    n = 16  # (8 / patch 2)^2 noise tokens
    (qb, kb), (ql, kl) = _first_block_qk(base, z, zl, t, s), _first_block_qk(lora, z, zl, t, s)
    torch.testing.assert_close(ql[:, :, :n], qb[:, :, :n], rtol=0, atol=1e-6)  # noise tokens: the frozen prior
    torch.testing.assert_close(kl[:, :, :n], kb[:, :, :n], rtol=0, atol=1e-6)
    assert (ql[:, :, n:] - qb[:, :, n:]).abs().max() > 1e-2  # condition tokens: adapted
    # the per-token modulation of the noise tokens comes from the frozen adaLN too
    blk_b, blk_l = base.blocks[0], lora.blocks[0]
    with torch.no_grad():
        c_noise, c_cond = base.t_embedder(t), base.t2_embedder(s)
        mb, ml = blk_b.modulation(c_noise, c_cond, n, n), blk_l.modulation(c_noise, c_cond, n, n)
    for a, b in zip(mb, ml):
        torch.testing.assert_close(b[:, :n], a[:, :n], rtol=0, atol=1e-6)
    assert any((b[:, n:] - a[:, n:]).abs().max() > 1e-3 for a, b in zip(mb, ml))


def probe(seed):
    """(z_t, t_cur, z_lq, t_tar) for comparing two models' outputs: a one-step and a shortcut call."""
    g = torch.Generator().manual_seed(seed)
    z, zl = torch.randn(2, 48, 8, 8, generator=g), torch.randn(2, 48, 8, 8, generator=g)
    return z, torch.tensor([1.0, 0.5]), zl, torch.tensor([0.0, 0.25])


def test_export_gives_plain_model_with_identical_outputs(prior_dir, tmp_path):
    model, mcfg = sad_model(prior_dir)
    randomize_lora(model)
    with torch.no_grad():  # as if training had moved them too
        model.c_embedder.weight.mul_(1.1)
        model.t2_embedder.mlp[0].bias.add_(0.05)
    folder = export_model(model, mcfg, tmp_path / "exported", meta={"trained": {"stage": "sad"}})
    assert any(type(m).__module__.startswith("peft") for m in model.modules())  # the training model is untouched
    plain, cfg = load_pretrained(folder)
    assert not any(type(m).__module__.startswith("peft") for m in plain.modules())
    assert sum(isinstance(m, CondLoRALinear) for m in plain.modules()) == 10
    assert cfg["model"]["cond_lora_rank"] == 4 and cfg["trained"] == {"stage": "sad"}
    z, t, zl, s = probe(1)
    with torch.no_grad():
        want, got = model.eval()(z, t, zl, s), plain(z, t, zl, s)
        base = load_pretrained(prior_dir)[0](z, t, zl, s)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (want - base).abs().max() > 1e-3  # and the LoRA did change the output


def test_sad_continues_an_exported_model_with_more_rank(prior_dir, tmp_path):
    """--init an exported SAD model: its LoRA becomes the first components of a larger one (another scale too),
    so training resumes from the very function that was exported; a smaller rank is refused."""
    model, mcfg = sad_model(prior_dir)
    folder = export_model(randomize_lora(model), mcfg, tmp_path / "exported")
    plain = load_pretrained(folder)[0]
    more, _ = sad_model(folder, lora_rank=8, lora_alpha=4)
    assert {p.shape for n, p in more.named_parameters() if "lora_A" in n} >= {torch.Size([8, 32])}
    z, t, zl, s = probe(2)
    with torch.no_grad():
        torch.testing.assert_close(more.eval()(z, t, zl, s), plain(z, t, zl, s), rtol=1e-5, atol=1e-6)
    again = load_pretrained(export_model(more, {**mcfg}, tmp_path / "again"))[0]
    assert again.config.cond_lora_rank == 8
    with pytest.raises(TeasrError, match="rank >= that"):
        sad_model(folder, lora_rank=2)


def test_export_truncates_lora_rank_by_svd(prior_dir, tmp_path):
    """--lora-rank: a rank-8 LoRA whose deltas have rank 4 exports at rank 4 with the same outputs and a smaller
    file; below that, the output moves."""
    model, mcfg = sad_model(prior_dir, lora_rank=8, lora_alpha=4)
    randomize_lora(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n:
                p[4:] = 0  # each delta B A now has rank 4
    full = export_model(model, mcfg, tmp_path / "full")
    four, two = (export_model(model, mcfg, tmp_path / f"r{r}", lora_rank=r) for r in (4, 2))
    z, t, zl, s = probe(3)
    (m_full, _), (m_four, c_four), (m_two, _) = (load_pretrained(f) for f in (full, four, two))
    with torch.no_grad():
        want = m_full(z, t, zl, s)
        torch.testing.assert_close(m_four(z, t, zl, s), want, rtol=1e-4, atol=1e-5)
        assert (m_two(z, t, zl, s) - want).abs().max() > 1e-4
    assert c_four["model"]["cond_lora_rank"] == 4 and m_four.blocks[0].attn.qkv.scale == 1.0
    assert (four / "model.safetensors").stat().st_size < (full / "model.safetensors").stat().st_size


# ----------------------------------------------------------------------------- data: determinism and sizes


@pytest.mark.parametrize("degradation", ["bicubic", "mild", "realesrgan"])
def test_batches_are_deterministic_per_sample_and_sized(photos, degradation):

    cfg = tiny_cfg(photos, "unused", degradation=degradation, crop=64)
    images = HQImages(list_images(cfg.data), cfg.crop)
    shape = (48, 16, 16)
    hq, lq, d = make_batch(images, cfg, 0, 3, shape, "cpu")
    assert hq.shape == (3, 3, 64, 64) and lq.shape == (3, 3, 16, 16) and d["eps"].shape == (3, *shape)
    assert 0 <= lq.min() and lq.max() <= 1
    # sample k is a pure function of (seed, k): a batch of 2 from sample 1 repeats samples 1 and 2
    hq2, lq2, d2 = make_batch(images, cfg, 1, 2, shape, "cpu")
    assert torch.equal(hq2, hq[1:]) and torch.equal(lq2, lq[1:]) and all(torch.equal(d2[k], d[k][1:]) for k in d)
    assert not torch.equal(hq[0], hq[1]) and not torch.equal(d["eps"][0], d["eps"][1])
    other = make_batch(images, tiny_cfg(photos, "unused", degradation=degradation, crop=64, seed=1), 0, 3, shape, "cpu")
    assert not torch.equal(other[0], hq)  # another seed, other crops


def test_hq_images_stream_from_disk_with_a_bounded_cache(photos, tmp_path):
    """Decoded photos are kept for the last `cache` images only; pixels are the files' own (8 bit, exactly as
    Pillow decodes them), with a phone's EXIF rotation applied; unusable files are remembered, not re-read."""
    files = sorted(photos.glob("*.png"))
    arr = getattr(skdata, "chelsea")()  # 300 x 451
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(arr).save(tmp_path / "phone.jpg", quality=95, exif=exif)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    images = HQImages([*files, tmp_path / "phone.jpg", tmp_path / "broken.png"], 64, cache=2)
    for i, f in enumerate(files):
        expected = torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(images.load(i), expected)
        assert len(images._mem) == min(i + 1, 2)
    assert list(images._mem) == [1, 2]  # least recently used first out
    images.load(1)
    images.load(3)
    assert list(images._mem) == [1, 3]
    with Image.open(tmp_path / "phone.jpg") as im:  # the JPEG's own pixels, turned upright
        upright = torch.from_numpy(np.rot90(np.asarray(im.convert("RGB")), -1).copy()).permute(2, 0, 1)
    assert torch.equal(images.load(3), upright) and images.load(3).shape == (3, 451, 300)
    with pytest.warns(UserWarning, match="broken.png"):
        assert images.load(4) is None
    assert images.skipped == {4} and images.load(4) is None and 4 not in images._mem
    none = HQImages(files, 64, cache=0)
    assert torch.equal(none.load(0), images.load(0)) and not none._mem


def test_degradation_mixture_draws_each_kind_per_sample_reproducibly(photos):

    mix = {"bicubic": 1.0, "realesrgan": 1.0}
    g = lambda k: torch.Generator().manual_seed(k)  # noqa: E731
    kinds = [pick_degradation(mix, g(k)) for k in range(40)]
    assert set(kinds) == set(mix) and kinds == [pick_degradation(mix, g(k)) for k in range(40)]
    assert pick_degradation({"mild": 0.0, "bicubic": 2.0}, g(0)) == "bicubic"
    cfg = tiny_cfg(photos, "unused", degradation=mix, crop=64)
    hq, lq, _ = make_batch(HQImages(list_images(cfg.data), cfg.crop), cfg, 0, 8, (48, 16, 16), "cpu")
    clean = [torch.equal(lq[i], bicubic_lq(hq[i : i + 1], 4)[0]) for i in range(8)]
    assert any(clean) and not all(clean)  # some samples plain bicubic, others degraded
    for bad in ({"bicubic": -1.0}, {"jpeg": 1.0}, {}, "heavy", {"mild": "x"}):
        with pytest.raises(TeasrError, match="degradation"):
            tiny_cfg(photos, "unused", degradation=bad)


def test_a_prior_can_grow_a_conv_head(photos, prior_dir, tmp_path):
    """--init with a recipe that adds a conv head keeps every trained weight (same outputs at first);
    a SAD stage keeps the prior's architecture (it trains a LoRA, and with train_head the head it has)."""
    cfg = tiny_cfg(photos, tmp_path / "g", init=str(prior_dir), model={**TINY, "depth": 3, "head_channels": 8})
    grown, mcfg = build_model(cfg)
    prior, pcfg = load_pretrained(prior_dir)
    assert mcfg["model"] == {**pcfg["model"], "head_channels": 8} and grown.head is not None
    z, zl = torch.randn(1, 48, 6, 6), torch.randn(1, 48, 6, 6)
    with torch.no_grad():
        assert torch.equal(grown.eval()(z, 0.5, zl, 0.5), prior(z, 0.5, zl, 0.5))
    sad, _ = build_model(tiny_cfg(photos, tmp_path / "s", init=str(prior_dir), stage="sad", model=cfg.model))
    assert sad.head is None


# ----------------------------------------------------------------------------- the loop


def test_grad_accumulation_matches_bigger_batch(photos, tmp_path):
    """batch 2 x accum 1 and batch 1 x accum 2 see the same samples and give the same weights."""
    big = tmp_path / "big"
    acc = tmp_path / "acc"
    train(tiny_cfg(photos, big, steps=2, batch_size=2, grad_accum=1, lr=1e-3))
    train(tiny_cfg(photos, acc, steps=2, batch_size=1, grad_accum=2, lr=1e-3))
    a, b = trainable_weights(big, 2), trainable_weights(acc, 2)
    assert_same(a, b, atol=1e-6)
    init = TeasrDiT(DiTConfig.from_dict({"latent_channels": 48, **TINY})).state_dict()
    assert max((a[k] - init[k]).abs().max() for k in a) > 1e-3  # the two steps did move the weights


def test_resume_after_kill_equals_uninterrupted_run(photos, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    kw = dict(steps=4, batch_size=2, lr=1e-3, ckpt_every=1, keep_last=10, ema=0.9)
    train(tiny_cfg(photos, straight, **kw))

    def die_at_step_3(rec):  # step 3 is computed and logged, but killed before its checkpoint is written
        if rec.get("step") == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(photos, killed, **kw), callback=die_at_step_3)
    assert latest_checkpoint(killed).name == "ckpt-0000002"
    (killed / ".ckpt-0000003.tmp").mkdir()  # a half-written checkpoint is ignored
    (killed / ".ckpt-0000003.tmp" / "state.json").write_text("{}")
    (killed / "ckpt-0000009").mkdir()  # so is a folder without its state.json
    assert latest_checkpoint(killed).name == "ckpt-0000002"
    with pytest.raises(TeasrError, match="--resume"):
        train(tiny_cfg(photos, killed, **kw))  # not resuming an existing run is refused
    train(tiny_cfg(photos, killed, **kw), resume=True)
    for f in ("trainable", "optimizer", "ema"):
        assert_same(
            load_file(straight / "ckpt-0000004" / f"{f}.safetensors"),
            load_file(killed / "ckpt-0000004" / f"{f}.safetensors"),
        )
    s1, s2 = (json.loads((r / "ckpt-0000004" / "state.json").read_text()) for r in (straight, killed))
    assert s1 == s2 and s1["step"] == 4
    assert_same(load_file(straight / "model" / "model.safetensors"), load_file(killed / "model" / "model.safetensors"))
    # step 3, logged before the kill, is logged once: by the resumed run, with the straight run's numbers
    recs = [[json.loads(ln) for ln in (r / "metrics.jsonl").read_text().splitlines()] for r in (straight, killed)]
    losses = [[{k: v for k, v in r.items() if k in ("step", "loss", "flow")} for r in rs if "loss" in r] for rs in recs]
    assert [r["step"] for r in losses[1]] == [1, 2, 3, 4] and losses[0] == losses[1]
    assert [r.get("from_step") for r in recs[1] if r.get("event") == "resume"] == [2]


def test_linear_schedule_warms_up_then_falls_to_zero_at_the_last_step(photos, tmp_path):
    """Each step's logged rate is lr * lr_factor, across a kill and resume: warmup 1/2, then 1 - s/steps."""
    kw = dict(steps=4, batch_size=1, ckpt_every=1, warmup=2, lr=1e-3, lr_schedule="linear")
    recs = []

    def killed_at_step_3(rec):  # logged before its checkpoint: the resume recomputes step 3 from ckpt 2
        if rec.get("step") == 3:
            raise KeyboardInterrupt
        recs.append(rec)

    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(photos, tmp_path, **kw), callback=killed_at_step_3)
    train(tiny_cfg(photos, tmp_path, **kw), resume=True, callback=recs.append)
    assert [r["lr"] for r in recs if "lr" in r] == pytest.approx([1e-3 * f for f in (1 / 2, 3 / 4, 2 / 4, 1 / 4)])


def test_resume_with_a_new_learning_rate_uses_it(photos, tmp_path):
    """A recipe's lr wins over the one saved with the optimizer state (lowering the rate of a run that diverges)."""
    kw = dict(steps=2, batch_size=1, ckpt_every=1, warmup=0)
    train(tiny_cfg(photos, tmp_path, lr=1e-3, **kw))
    recs = []
    train(tiny_cfg(photos, tmp_path, lr=2e-4, **{**kw, "steps": 3}), resume=True, callback=recs.append)
    assert [r["lr"] for r in recs if "lr" in r] == [pytest.approx(2e-4)]


def test_lora_lr_is_the_lora_factors_own_rate_across_a_resume(photos, prior_dir, tmp_path):
    """Adam's first update of a weight with a gradient is sign(g) * rate (bias-corrected, eps aside): after one SAD
    step the weights trained in full moved by lr, the LoRA's up factors (zero before) by lora_lr. A run killed
    after step 1 resumes with both rates and ends where the straight run ends; --export rebuilds both groups."""
    kw = dict(stage="sad", init=str(prior_dir), batch_size=1, lr=1e-2, lora_lr=1e-3, lora_rank=4, lora_alpha=4)
    one = train(tiny_cfg(photos, tmp_path / "one", steps=1, **kw))
    prior, got = load_file(prior_dir / "model.safetensors"), load_file(one / "model.safetensors")
    full = max((got[k] - prior[k]).abs().max().item() for k in prior if k.startswith(("c_embedder.", "t2_embedder.")))
    up = max(v.abs().max().item() for k, v in got.items() if "lora_up" in k)
    assert full == pytest.approx(1e-2, rel=1e-3) and up == pytest.approx(1e-3, rel=1e-3)

    def killed_at_step_2(rec):
        if rec.get("step") == 2:
            raise KeyboardInterrupt

    two = dict(kw, steps=2, ckpt_every=1)
    straight = train(tiny_cfg(photos, tmp_path / "straight", **two))
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(photos, tmp_path / "killed", **two), callback=killed_at_step_2)
    resumed = train(tiny_cfg(photos, tmp_path / "killed", **two), resume=True)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    exported = export_checkpoint(tmp_path / "killed", tmp_path / "exported")
    assert all(torch.equal(a[k], v) for k, v in load_file(exported / "model.safetensors").items())


def test_short_prior_run_on_real_photos_lowers_flow_loss(photos, tmp_path):
    """20 steps on three real photos. The logged flow loss is noisy (random t per sample), so besides first-5 vs
    last-5 it is compared with a run at lr 0, which sees exactly the same samples, times and noise."""

    def run(name, lr):
        recs = []
        out = train(
            tiny_cfg(photos, tmp_path / name, steps=20, batch_size=4, crop=64, lr=lr, seed=0), callback=recs.append
        )
        return out, [r["flow"] for r in recs if "flow" in r]

    out, flow = run("run", 3e-3)
    _, frozen = run("frozen", 0.0)
    assert len(flow) == 20 and all(np.isfinite(flow))
    assert flow[0] == pytest.approx(frozen[0], rel=1e-6)  # same first batch, same weights
    assert np.mean(flow[-5:]) < 0.92 * np.mean(flow[:5])  # 0.85 here; about 1 untrained
    assert np.mean(flow[-5:]) < 0.9 * np.mean(frozen[-5:])  # 0.79 here; exactly 1 untrained
    lines = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["event"] == "start" and lines[-1]["event"] == "export"
    assert [ln["flow"] for ln in lines if "flow" in ln] == flow
    assert (out / "model.safetensors").exists()


def test_sad_stage_run_changes_only_condition_branch(photos, prior_dir, tmp_path):
    """`train` for stage sad (every SAD term, LPIPS when available): the exported model keeps every frozen weight."""
    try:
        from teasr_cli.metrics import LPIPS  # noqa: F401

        lpips = "alex"
    except ImportError:
        lpips = ""
    recs = []
    out = train(
        tiny_cfg(
            photos,
            tmp_path / "sad",
            stage="sad",
            init=str(prior_dir),
            steps=2,
            batch_size=2,
            lr=1e-2,
            lora_rank=4,
            lora_alpha=4,
            lpips=lpips,
            sad={"lambda_last": 1.0, "last_steps": [2, 4]},
        ),
        callback=recs.append,
    )
    log = [r for r in recs if "loss" in r][-1]
    assert {"flow", "cons", "data", "adv", "rect", "last"} <= log.keys() and np.isfinite(log["loss"])
    prior, got = load_file(prior_dir / "model.safetensors"), load_file(out / "model.safetensors")
    lora_keys = {k for k in got if ".lora_" in k}
    for k, v in prior.items():
        k2 = k if k in got else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        if k.startswith(("c_embedder.", "t2_embedder.")):
            assert not torch.equal(got[k2], v), k  # trained in full
        else:
            assert torch.equal(got[k2], v), k  # the noise branch / generative prior is untouched
    assert any(got[k].abs().max() > 0 for k in lora_keys if "lora_up" in k)


def test_sad_stage_can_train_the_conv_head_too(photos, prior_dir, tmp_path):
    """train_head: the head moves with the LoRA, every other noise-branch weight stays the prior's; a model
    without a head is a one-line error."""
    grown, mcfg = build_model(tiny_cfg(photos, tmp_path / "g", init=str(prior_dir), model={**TINY, "head_channels": 8}))
    with torch.no_grad():  # a trained head is not the identity: give its zero-initialised output conv weights
        grown.head.out.weight.normal_(0, 0.05)
    export_model(grown, mcfg, tmp_path / "headed")
    out = train(
        tiny_cfg(
            photos,
            tmp_path / "sad",
            stage="sad",
            init=str(tmp_path / "headed"),
            steps=2,
            batch_size=2,
            lr=1e-2,
            lora_rank=4,
            lora_alpha=4,
            train_head=True,
        )
    )
    prior, got = load_file(tmp_path / "headed" / "model.safetensors"), load_file(out / "model.safetensors")
    for k, v in prior.items():
        k2 = k if k in got else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        trained = k.startswith(("c_embedder.", "t2_embedder.", "head."))
        assert torch.equal(got[k2], v) != trained, k
    with pytest.raises(TeasrError, match="conv head"):
        build_model(tiny_cfg(photos, tmp_path / "x", stage="sad", init=str(prior_dir), train_head=True))
    conv_only = train(
        tiny_cfg(photos, tmp_path / "conv", stage="regress", steps=1, model={**TINY, "depth": 0, "trunk_channels": 8})
    )
    with pytest.raises(TeasrError, match="conv-only"):  # no DiT blocks for the LoRA: one line, not peft's traceback
        build_model(tiny_cfg(photos, tmp_path / "y", stage="sad", init=str(conv_only)))
    # a deeper head: the new residual convs start at zero (the same function) and then train
    deep = dict(
        stage="sad",
        init=str(tmp_path / "headed"),
        lora_rank=4,
        lora_alpha=4,
        train_head=True,
        model={**TINY, "head_channels": 8, "head_depth": 4},
    )
    grown, mcfg = build_model(tiny_cfg(photos, tmp_path / "d", **deep))
    assert len(grown.head.mid) == 4 and mcfg["model"]["head_depth"] == 4
    headed, _ = load_pretrained(tmp_path / "headed")
    with torch.no_grad():
        assert torch.equal(grown.eval()(*probe(0)), headed(*probe(0)))
    out = train(tiny_cfg(photos, tmp_path / "deep", steps=2, batch_size=2, lr=1e-2, **deep))
    assert load_file(out / "model.safetensors")["head.mid.3.weight"].abs().max() > 0


def test_regress_stage_trains_every_weight_on_the_pixel_anchor_only(photos, tmp_path):
    """The regression baseline: the same network, one pass from t=1, MSE (+ LPIPS) only; all weights train."""
    recs = []
    out = train(
        tiny_cfg(photos, tmp_path / "reg", stage="regress", steps=2, batch_size=2, lr=1e-2), callback=recs.append
    )
    log = [r for r in recs if "loss" in r][-1]
    assert {k for k in log if k in ("flow", "cons", "data", "adv", "rect")} == {"data"}
    assert log["loss"] == pytest.approx(log["data"])
    init = TeasrDiT(DiTConfig.from_dict({"latent_channels": 48, **TINY})).state_dict()
    got = load_file(out / "model.safetensors")
    assert got.keys() == init.keys()
    zero_init = [k for k in init if k.endswith(".weight") and not init[k].any()]  # adaLN-Zero and the final layer
    assert len(zero_init) >= 3 and all(got[k].any() for k in zero_init)


# ----------------------------------------------------------------------------- CLI


@pytest.fixture
def keep_signal_handlers():
    """`teasr train` installs SIGINT/SIGTERM handlers (graceful stop); give pytest its own back."""
    import signal

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def test_cli_train_resume_export_then_upscale(photos, tmp_path, keep_signal_handlers):
    from teasr_cli.cli import app

    recipe = tmp_path / "tiny.toml"
    recipe.write_text(
        "model = { patch_size = 2, hidden_size = 32, depth = 1, num_heads = 2 }\n"
        'degradation = "bicubic"\nlpips = ""\nsample_every = 0\nlog_every = 1\nckpt_every = 1\n'
        "batch_size = 1\n[stages.prior]\nlr = 1e-3\n"
    )
    run = tmp_path / "run"
    runner = CliRunner()
    base = ["train", "--out", str(run)]
    first = ["-c", str(recipe), "--data", str(photos), "--steps", "3", "--crop", "32", "--threads", "2"]
    r = runner.invoke(app, base + first)
    assert r.exit_code == 0, r.output
    assert latest_checkpoint(run).name == "ckpt-0000003"
    r = runner.invoke(app, base + ["--resume", "--stage", "sad"])
    assert r.exit_code != 0 and "--stage cannot change on --resume" in r.output and "Traceback" not in r.output
    # the saved config with what the command changes: 2 more steps, other cores, a new rate
    r = runner.invoke(app, base + ["--resume", "--steps", "5", "--threads", "1", "--lr", "5e-4"])
    assert r.exit_code == 0, r.output
    assert latest_checkpoint(run).name == "ckpt-0000005"
    saved = json.loads((run / "train_config.json").read_text())
    assert (saved["threads"], saved["lr"], saved["crop"]) == (1, 5e-4, 32)
    steps = [json.loads(ln).get("step") for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s] == [1, 2, 3, 3, 4, 5, 5]  # logs, exports (3 and 5), no step repeated
    r = runner.invoke(app, ["train", "--export", str(run), "-o", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    assert_same(load_file(tmp_path / "m" / "model.safetensors"), load_file(run / "model" / "model.safetensors"))
    Image.fromarray(skdata.chelsea()).resize((32, 24)).save(tmp_path / "cat.png")
    r = runner.invoke(
        app,
        [
            "upscale",
            str(tmp_path / "cat.png"),
            "-o",
            str(tmp_path / "cat4.png"),
            "-m",
            str(tmp_path / "m"),
            "--device",
            "cpu",
            "--threads",
            "1",
        ],
    )
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "cat4.png").size == (128, 96)
    r = runner.invoke(app, ["train", "--export", str(tmp_path), "-o", str(tmp_path / "x")])
    assert r.exit_code != 0 and "no checkpoint" in r.output


# ----------------------------------------------------------------------------- multi-process


@pytest.mark.parametrize("stage", ["prior", "sad"])
def test_two_process_cpu_ddp_matches_one_process_batch_2(photos, prior_dir, tmp_path, stage):
    """torchrun, 2 CPU processes (gloo), batch 1 each == 1 process, batch 2. Slow (~10-30 s): two interpreters.
    Stage sad back-propagates four graphs per step, three under no_sync: DDP must still average the sum."""
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(
        "model = { patch_size = 2, hidden_size = 32, depth = 1, num_heads = 2 }\n"
        'degradation = "bicubic"\nlpips = ""\nsample_every = 0\nlog_every = 1\nlr = 1e-3\n'
        "lora_rank = 4\nlora_alpha = 4\n"
    )
    run = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    init = ["--init", str(prior_dir)] if stage == "sad" else []
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "teasr_cli",
        "train",
        "-c",
        str(recipe),
        "--data",
        str(photos),
        "--out",
        str(run),
        "--stage",
        stage,
        *init,
        "--steps",
        "2",
        "--batch-size",
        "1",
        "--crop",
        "32",
        "--threads",
        "1",
    ]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [c.name for c in run.glob("ckpt-*")] == ["ckpt-0000002"]
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("event") for r in recs].count("start") == 1  # one writer: rank 0
    log = recs[-2]
    assert log["step"] == 2 and log["samples_s"] == pytest.approx(2 * log["it_s"])  # 2 processes x batch 1
    one = tmp_path / "one"
    train(
        tiny_cfg(
            photos,
            one,
            steps=2,
            batch_size=2,
            lr=1e-3,
            stage=stage,
            init=str(prior_dir) if init else None,
            lora_rank=4,
            lora_alpha=4,
        )
    )
    # rank r takes samples 2k + r: together the same samples as one process with batch 2, gradients averaged
    assert_same(trainable_weights(run, 2), trainable_weights(one, 2), atol=1e-6)
    assert (run / "model" / "model.safetensors").exists()

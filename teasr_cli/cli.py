"""The `teasr` command line: thin wrappers over the library; the only module that prints."""
from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from teasr_cli.errors import ImageWriteError, TeasrError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="teasr: x4 photo upscaling with an any-step diffusion transformer (TEASR).")
console = Console(stderr=True)


def fail(msg: str, code: int = 2):
    console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _warn(message, category, filename, lineno, file=None, line=None):
    console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


# ------------------------------------------------------------------ shared options
ModelOpt = typer.Option(None, "--model", "-m", help="Model: a name (see `teasr models`), a local folder, or a Hub repo `org/name[@revision]`. Default: the embedded model.")
StepsOpt = typer.Option(1, "--steps", "-s", min=1, help="Sampling steps: 1 is fastest and most faithful, more adds natural detail.")
SeedOpt = typer.Option(0, "--seed", help="Noise seed: same seed, same output.")
TileOpt = typer.Option(None, "--tile", min=1, help="Tile size in latent pixels (default: auto from image size and memory).")
OverlapOpt = typer.Option(None, "--tile-overlap", min=0, help="Tile overlap in latent pixels (default: a quarter of the tile).")
ColorOpt = typer.Option("wavelet", "--color-fix", help="Colour correction toward the input: wavelet, adain or none.")
GridShiftOpt = typer.Option(True, "--grid-shift/--no-grid-shift", help="With several steps, move the patch grid by half a patch on every other step (hides patch seams).")
AnchorOpt = typer.Option(True, "--anchor/--no-anchor", help="With several steps, take what the input's pixel grid can see from the 1-step result (one more model call) and only the finer detail from the N steps: more faithful.")
FidelityOpt = typer.Option(0.0, "--fidelity", min=0.0, max=1.0, help="For clean inputs (resized, not blurry, noisy or compressed): keep 1-F of the added detail and make the output downscale back to the input exactly. 0 = off; 0.5 is a good start.")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu, cuda or mps.")
DtypeOpt = typer.Option("auto", "--dtype", help="auto (bf16 for qwen-image and on CPUs with AMX, else fp32), fp32, bf16 or fp16 (GPU).")
OffloadOpt = typer.Option("none", "--offload", help="Big models: none, model (one of DiT/VAE on the GPU at a time) or sequential (layer by layer, least memory).")
ThreadsOpt = typer.Option(None, "--threads", min=1, help="CPU threads for PyTorch (default: all cores).")
FormatOpt = typer.Option(None, "--format", "-f", help="Output format (png, jpg, webp, tiff, bmp); default from the output suffix.")
QualityOpt = typer.Option(95, "--quality", min=1, max=100, help="JPEG/WebP quality.")
OverwriteOpt = typer.Option(False, "--overwrite", help="Replace existing output files.")
MaxPixelsOpt = typer.Option(None, "--max-pixels", min=1, help="Refuse inputs with more pixels than this (decompression-bomb guard; default 100M).")


def _load(model, device, dtype, threads, offload="none"):
    from teasr_cli.pipeline import Upscaler

    with console.status("loading model..."):
        return Upscaler.from_pretrained(model, device=device, dtype=dtype, threads=threads, offload=offload)


def _dist() -> tuple[int, int, int]:
    """(rank, world size, local rank) when started by `accelerate launch` / torchrun, else (0, 1, 0)."""
    import os

    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def _settings(steps, seed, tile, tile_overlap, color_fix, grid_shift=True, anchor=True, fidelity=0.0):
    from teasr_cli.pipeline import UpscaleSettings

    return UpscaleSettings(steps=steps, seed=seed, tile=tile, tile_overlap=tile_overlap, color_fix=color_fix,
                           grid_shift=grid_shift, anchor=anchor, fidelity=fidelity)


def _suffix_for(fmt: Optional[str], default: str) -> str:
    if not fmt:
        return default
    fmt = fmt.lower().lstrip(".")
    return {"jpeg": ".jpg", "tif": ".tiff"}.get(fmt, "." + fmt)


def _upscale_file(up, src: Path, dst: Path, settings, fmt, quality, max_pixels, callback=None):
    from teasr_cli.imageio import DEFAULT_MAX_PIXELS, read_image, write_image

    pic = read_image(src, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
    out = up.upscale_picture(pic, settings, callback)
    write_image(out, dst, fmt=fmt, quality=quality, overwrite=True)


def _same_file(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve() or (b.exists() and a.exists() and a.samefile(b))


@app.command(epilog="""[bold]Examples[/]\n
  teasr upscale photo.jpg                       [dim]# -> photo_x4.jpg, 1 step[/]\n
  teasr upscale photo.jpg --steps 4 -o big.png  [dim]# more natural detail[/]\n
  teasr upscale scan.tif --model org/name@v1 --device cuda --dtype bf16""")
def upscale(
    input: Path = typer.Argument(..., help="Image to upscale (JPEG, PNG, WebP, TIFF, BMP)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output file (default: INPUT_x4 with the input's suffix)."),
    model: Optional[str] = ModelOpt, steps: int = StepsOpt, seed: int = SeedOpt, tile: Optional[int] = TileOpt,
    tile_overlap: Optional[int] = OverlapOpt, color_fix: str = ColorOpt, grid_shift: bool = GridShiftOpt,
    anchor: bool = AnchorOpt, fidelity: float = FidelityOpt, device: str = DeviceOpt, dtype: str = DtypeOpt, threads: Optional[int] = ThreadsOpt, format: Optional[str] = FormatOpt, quality: int = QualityOpt,
    overwrite: bool = OverwriteOpt, max_pixels: Optional[int] = MaxPixelsOpt, offload: str = OffloadOpt,
):
    """Upscale one image x4."""
    from teasr_cli.imageio import output_format

    try:
        if not input.is_file():
            raise TeasrError(f"{input}: no such file" if not input.exists() else f"{input}: not a file")
        dst = output or input.with_name(f"{input.stem}_x4{_suffix_for(format, input.suffix)}")
        output_format(dst, format)   # an unknown format fails now, not after minutes of sampling
        if _same_file(input, dst):
            raise ImageWriteError(f"{dst}: output would overwrite the input; choose another -o")
        if dst.exists() and not overwrite:
            raise ImageWriteError(f"{dst} exists; pass --overwrite to replace it")
        if not dst.parent.exists():
            raise ImageWriteError(f"{dst.parent}: output folder does not exist")
        up = _load(model, device, dtype, threads, offload)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task(f"upscaling {input.name}", total=steps)
            _upscale_file(up, input, dst, _settings(steps, seed, tile, tile_overlap, color_fix, grid_shift, anchor, fidelity),
                          format, quality, max_pixels, callback=lambda i, n, z: bar.update(task, completed=i, total=n))
    except TeasrError as e:
        fail(str(e))
    console.print(f"wrote {dst}", highlight=False)


def _collect(folder: Path, pattern: str, recursive: bool, outdir: Path) -> list[Path]:
    from teasr_cli.imageio import IMAGE_SUFFIXES

    files = folder.rglob(pattern) if recursive else folder.glob(pattern)
    out = outdir.resolve()
    return sorted(p for p in files if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and out not in p.resolve().parents)   # never re-upscale our own outputs


@app.command(epilog="""[bold]Examples[/]\n
  teasr batch ./photos                          [dim]# -> ./photos_x4/[/]\n
  teasr batch ./photos -o ./big -r --glob '*.jpg' --steps 4\n
  teasr batch ./photos -f png                   [dim]# interrupted? run again: finished files are skipped[/]""")
def batch(
    folder: Path = typer.Argument(..., help="Folder of images."),
    outdir: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder (default: FOLDER_x4 beside FOLDER)."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Include subfolders; the folder tree is kept in the output."),
    glob: str = typer.Option("*", "--glob", "-g", help="Only files matching this pattern, e.g. '*.jpg'."),
    model: Optional[str] = ModelOpt, steps: int = StepsOpt, seed: int = SeedOpt, tile: Optional[int] = TileOpt,
    tile_overlap: Optional[int] = OverlapOpt, color_fix: str = ColorOpt, grid_shift: bool = GridShiftOpt,
    anchor: bool = AnchorOpt, fidelity: float = FidelityOpt, device: str = DeviceOpt, dtype: str = DtypeOpt, threads: Optional[int] = ThreadsOpt, format: Optional[str] = FormatOpt, quality: int = QualityOpt,
    overwrite: bool = OverwriteOpt, max_pixels: Optional[int] = MaxPixelsOpt, offload: str = OffloadOpt,
):
    """Upscale every image in a folder x4; resumes where an interrupted run stopped.

    Under `accelerate launch` (or torchrun) each process takes every WORLD_SIZE-th file, on its own GPU.
    """
    from teasr_cli.imageio import output_format

    if not folder.is_dir():
        fail(f"{folder}: no such folder")
    outdir = outdir or folder.with_name(folder.resolve().name + "_x4")
    if outdir.resolve() == folder.resolve():
        fail("the output folder is the input folder; choose another -o so no input is overwritten")
    try:
        if format:
            output_format(Path("x" + _suffix_for(format, ".png")), format)
        outdir.mkdir(parents=True, exist_ok=True)
    except TeasrError as e:
        fail(str(e))
    except OSError as e:
        fail(f"cannot create output folder {outdir}: {e.strerror}")
    files = _collect(folder, glob, recursive, outdir)
    if not files:
        fail(f"no images matching {glob!r} in {folder}" + ("" if recursive else " (use -r for subfolders)"), code=1)
    jobs = [(src, outdir / src.relative_to(folder).with_suffix(_suffix_for(format, src.suffix))) for src in files]
    rank, world, local_rank = _dist()
    jobs = jobs[rank::world]   # shard the sorted list before skipping, so no file is ever done twice
    if world > 1 and device == "auto":
        import torch
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    todo = [(s, d) for s, d in jobs if overwrite or not d.exists()]
    skipped = len(jobs) - len(todo)
    try:
        up = _load(model, device, dtype, threads, offload) if todo else None
    except TeasrError as e:
        fail(str(e))
    settings = _settings(steps, seed, tile, tile_overlap, color_fix, grid_shift, anchor, fidelity)
    failed: list[tuple[Path, str]] = []
    t0 = time.time()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task("upscaling", total=len(todo))
        for src, dst in todo:
            bar.update(task, description=f"{src.name[:30]:30}")
            try:
                dst.parent.mkdir(parents=True, exist_ok=True)
                _upscale_file(up, src, dst, settings, format, quality, max_pixels)
            except TeasrError as e:
                failed.append((src, str(e)))
            except Exception as e:   # one odd file must not stop a long batch; it is reported below
                failed.append((src, f"{type(e).__name__}: {e}"))
            bar.advance(task)
    table = Table(title="teasr batch" + (f" (process {rank + 1}/{world})" if world > 1 else ""), show_header=False)
    table.add_row("upscaled", str(len(todo) - len(failed)))
    table.add_row("skipped (output exists)", str(skipped))
    table.add_row("failed", str(len(failed)))
    table.add_row("output folder", str(outdir))
    table.add_row("time", f"{time.time() - t0:.1f} s")
    console.print(table)
    for src, msg in failed:
        console.print(f"[red]failed:[/] {msg if str(src) in msg else f'{src}: {msg}'}", highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(1)


@app.command(epilog="""[bold]Examples[/]\n
  teasr train --data photos/ --out runs/prior --config train/tiny-cpu.toml --stage prior\n
  teasr train --data photos/ --out runs/sad --stage sad --init runs/prior/model --steps 2000\n
  accelerate launch --config_file train/accelerate/ddp-2gpu.yaml -m teasr_cli train -c train/qwen-image-a100.toml --data lsdir/ --out runs/qwen\n
  teasr train --out runs/sad --resume                  [dim]# continue after a kill[/]\n
  accelerate launch teasr train ...                     [dim]# several GPUs / processes[/]\n
  teasr train --export runs/sad -o my-model            [dim]# plain model folder for `teasr upscale -m`[/]""")
def train(
    data: Optional[str] = typer.Option(None, "--data", help="HQ images: a folder (recursive), a .txt list, or a Hub dataset id."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder: checkpoints, metrics.jsonl, samples/, model/."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Recipe TOML (see train/)."),
    stage: Optional[str] = typer.Option(None, "--stage", help="prior (flow matching, all weights), sad (SAD + TAR, LoRA) or regress (the one-pass MSE + LPIPS baseline)."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="native (default) or qwen-image (needs a GPU; stage sad)."),
    base: Optional[str] = typer.Option(None, "--base", help="qwen-image base: Hub repo org/name[@revision] (or 'tiny' for a smoke run)."),
    init: Optional[str] = typer.Option(None, "--init", help="Model folder to start from (the prior, for --stage sad)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Optimizer steps."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", min=1),
    lr: Optional[float] = typer.Option(None, "--lr"),
    crop: Optional[int] = typer.Option(None, "--crop", help="HQ crop size in pixels."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    mixed_precision: Optional[str] = typer.Option(None, "--mixed-precision", help="no, bf16 or fp16 (GPU)."),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing"),
    threads: Optional[int] = ThreadsOpt,
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", min=0, help="Stop (checkpoint + export) after this much wall time."),
    max_cpu_minutes: Optional[float] = typer.Option(None, "--max-cpu-minutes", min=0, help="Stop (checkpoint + export) after this much process CPU time, summed over resumes."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its latest checkpoint."),
    export: Optional[Path] = typer.Option(None, "--export", help="Export a run (or one ckpt-*) to a plain model folder given by -o."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Where --export writes the model folder."),
    half: bool = typer.Option(False, "--half", help="With --export: store the weights in fp16 (half the size; loaded as fp32)."),
    no_ema: bool = typer.Option(False, "--no-ema", help="With --export: the live weights instead of their EMA."),
    lora_rank: Optional[int] = typer.Option(None, "--lora-rank", min=1, help="With --export: keep the N strongest components of each condition-branch LoRA (truncated SVD), for a smaller file."),
):
    """Train with Self-Adversarial Distillation (stage sad) or train the generative prior (stage prior)."""
    import json
    import signal

    import torch

    from teasr_cli import trainer

    try:
        if export is not None:
            if output is None:
                fail("--export needs -o MODEL_DIR")
            with console.status("exporting..."):
                folder = trainer.export_checkpoint(export, output, use_ema=not no_ema,
                                                   dtype=torch.float16 if half else None, lora_rank=lora_rank)
            console.print(f"exported {folder}")
            return
        if out is None:
            fail("--out RUN_DIR is required")
        recipe = config
        if resume and config is None and (out / "train_config.json").exists():
            saved = json.loads((out / "train_config.json").read_text())
            cfg = trainer.TrainConfig.load(None, **saved)
        else:
            if data is None and not resume:
                fail("--data is required (a folder of HQ images, a .txt list or a Hub dataset id)")
            cfg = trainer.TrainConfig.load(str(recipe) if recipe else None, data=data, out=str(out), stage=stage, init=init,
                                           backbone=backbone, base=base,
                                           steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr, crop=crop,
                                           seed=seed, mixed_precision=mixed_precision, threads=threads,
                                           gradient_checkpointing=gradient_checkpointing)
        if steps is not None:
            cfg.steps = steps
        for k, v in (("max_minutes", max_minutes), ("max_cpu_minutes", max_cpu_minutes)):
            if v is not None:   # also on --resume: a new session brings a new budget
                setattr(cfg, k, v)
        from teasr_cli.data import list_images
        list_images(cfg.data)   # a bad --data fails here, before any progress bar
    except TeasrError as e:
        fail(str(e))
    stop = {"now": False}

    def on_signal(signum, frame):
        if stop["now"]:
            raise KeyboardInterrupt
        stop["now"] = True
        console.print("stopping after this step (checkpoint kept; --resume continues); press Ctrl-C again to abort")

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console) as bar:
        task = bar.add_task(f"{cfg.stage}", total=cfg.steps, info="")

        def on_log(rec):
            if "step" in rec and "loss" in rec:
                terms = " ".join(f"{k} {rec[k]:.4f}" for k in ("loss", "flow", "cons", "data", "adv", "rect") if k in rec)
                bar.update(task, completed=rec["step"], info=f"{terms} | {rec['it_s']:.2f} it/s")
            elif rec.get("event") == "export":
                bar.update(task, completed=rec["step"])

        try:
            folder = trainer.train(cfg, resume=resume, callback=on_log, stop=lambda: stop["now"])
        except TeasrError as e:
            fail(str(e))
    if stop["now"]:
        console.print(f"stopped; resume with: teasr train --out {out} --resume")
        raise typer.Exit(130)
    console.print(f"done: model in {folder} (log: {out / 'metrics.jsonl'})")


METRIC_FORMATS = {"psnr": "{:.2f}", "ssim": "{:.4f}", "niqe": "{:.3f}", "fid": "{:.2f}"}   # as papers print them


def _eval_table(res, title: str) -> Table:
    """The papers' table: one row per method, one column per metric, the best value in bold."""
    table = Table(title=title, caption="bold: best per column", caption_justify="left")
    table.add_column("method")
    for k in res.metrics:
        table.add_column(f"{k.upper()} {'↑' if res.higher_is_better[k] else '↓'}", justify="right")
    best = {k: res.best(k) for k in res.metrics}
    for m in res.methods:
        cells = []
        for k in res.metrics:
            v = res.means[m][k]
            text = "n/a" if v is None else "inf" if v == float("inf") else METRIC_FORMATS.get(k, "{:.4f}").format(v)
            cells.append(f"[bold]{text}[/]" if best[k] == m else f"[dim]{text}[/]" if v is None else text)
        table.add_row(m, *cells)
    return table


@app.command("eval", epilog="""[bold]Examples[/]\n
  teasr eval --dataset realsr --steps 1,2,4,8        [dim]# StableSR test set, downloaded once[/]\n
  teasr eval --lq my_lr/ --hq my_hr/ --steps 1,4     [dim]# any folder pair, names matched[/]\n
  teasr eval --hq photos/ --degrade realesrgan --limit 20 --metrics psnr,lpips\n
  [dim]killed? run the same command again: finished images are not recomputed[/]""")
def eval_(
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="realsr, drealsr or div2k-val: the StableSR test sets, downloaded from the Hugging Face Hub on first use."),
    lq: Optional[Path] = typer.Option(None, "--lq", help="Folder of LQ images, paired by name with --hq."),
    hq: Optional[Path] = typer.Option(None, "--hq", help="Folder of HQ (ground-truth) images, 4x the LQ."),
    degrade: Optional[str] = typer.Option(None, "--degrade", help="Make each LQ from its --hq image: bicubic, mild or realesrgan."),
    degrade_seed: int = typer.Option(0, "--degrade-seed", help="Seed of the --degrade draws (per image: seed and index)."),
    model: Optional[str] = ModelOpt,
    steps: str = typer.Option("1,2,4,8", "--steps", "-s", help="Step counts to evaluate, comma-separated."),
    seed: int = SeedOpt,
    baseline: str = typer.Option("bicubic,lanczos", "--baseline", help="Baseline rows, comma-separated: bicubic, lanczos, realesrgan (Real-ESRGAN x4plus, optional package) or none."),
    metrics: str = typer.Option(",".join(("psnr", "ssim", "lpips", "dists", "niqe", "fid")), "--metrics",
                                help="Metrics, comma-separated: psnr, ssim, lpips, lpips-vgg, dists, niqe, fid."),
    crop_border: int = typer.Option(0, "--crop-border", min=0, help="Pixels cropped from each border for PSNR/SSIM (0 as pyiqa; BasicSR uses 4)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Results folder (default eval_results/<dataset>)."),
    save_images: bool = typer.Option(False, "--save-images", help="Also save every SR image under OUT/images/."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N images (quick checks)."),
    tile: Optional[int] = TileOpt, tile_overlap: Optional[int] = OverlapOpt, color_fix: str = ColorOpt,
    grid_shift: bool = GridShiftOpt, anchor: bool = AnchorOpt, fidelity: float = FidelityOpt, device: str = DeviceOpt,
    dtype: str = DtypeOpt, threads: Optional[int] = ThreadsOpt, offload: str = OffloadOpt,
):
    """Benchmark the model against ground truth: PSNR, SSIM, LPIPS, DISTS, NIQE, FID per step count."""
    from teasr_cli import benchsets
    from teasr_cli import evaluation as ev
    from teasr_cli.pipeline import COLOR_FIXES

    try:
        step_list = ev.parse_steps(steps)
        baselines = ev.parse_list(baseline, ev.BASELINES, "baseline")
        metric_list = ev.parse_list(metrics, ev.available_metrics(), "metric")
        if not metric_list:
            raise ev.EvalError("--metrics none leaves nothing to measure; name at least one metric")
        if color_fix not in COLOR_FIXES:
            raise TeasrError(f"unknown --color-fix {color_fix!r}; use one of {', '.join(COLOR_FIXES)}")
        pairs, label, data = benchsets.resolve_pairs(dataset, lq, hq, degrade, degrade_seed)
        pairs = pairs[:limit] if limit else pairs
        benchsets.check_sizes(pairs)   # a wrong-size pair fails now, not after an hour of sampling
        up = _load(model, device, dtype, threads, offload)
        baseline_methods = [ev.baseline(b) for b in baselines]   # an uninstalled optional baseline fails here
    except TeasrError as e:
        fail(str(e))
    out = out or Path("eval_results") / label
    settings = {"seed": seed, "tile": tile, "tile_overlap": tile_overlap, "color_fix": color_fix, "grid_shift": grid_shift,
                "anchor": anchor, "fidelity": fidelity}
    dtype = up.dtype_name   # what "auto" chose here
    methods = [ev.Method(f"teasr {s} step{'s' if s > 1 else ''}", _teasr_fn(up, _settings(s, **settings)), s,
                         {**settings, "steps": s, **_model_id(up), "dtype": dtype, "device": up.device.type})
               for s in step_list] + baseline_methods
    config = {"dataset": label, "data": data, "model": str(model or "default"), "model_folder": str(up.folder),
              "steps": step_list, "seed": seed, "degrade": degrade, "degrade_seed": degrade_seed if degrade else None,
              "baselines": baselines, "color_fix": color_fix, "anchor": anchor, "fidelity": fidelity, "dtype": dtype,
              "device": up.device.type}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task("evaluating", total=len(pairs))

        def on_progress(done, total, what):
            bar.update(task, completed=done, description=f"{what[:36]:36}")

        try:
            res = ev.evaluate(pairs, methods, metric_list, out, save_images, on_progress, config, crop_border,
                              device=up.device)
        except TeasrError as e:
            bar.remove_task(task)   # so the error below is the last and only line left
            error = f"{e} (finished images are kept in {out / ev.PER_IMAGE}; run again to resume)"
        else:
            error = None
    if error:
        fail(error)
    Console().print(_eval_table(res, f"teasr eval: {label} ({len(pairs)} images)"))
    for k, why in res.unavailable.items():
        console.print(f"[yellow]{k}:[/] n/a, {why}", highlight=False, soft_wrap=True)
    resumed = len(pairs) * len(methods) - res.computed
    console.print(f"wrote {out / 'results.json'}, results.csv and metrics_vs_steps.png"
                  + (f" ({resumed} of {len(pairs) * len(methods)} results resumed)" if resumed else ""),
                  highlight=False, soft_wrap=True)


def _teasr_fn(up, settings):
    return lambda lq: up.upscale_tensor(lq, settings)


def _model_id(up) -> dict:
    """What identifies the weights, so resumed results never mix two models saved in one folder."""
    w = Path(up.folder) / "model.safetensors"
    st = w.stat() if w.exists() else None
    return {"model": str(up.folder), "weights": [st.st_size, st.st_mtime_ns] if st else None}


@app.command()
def models():
    """List the embedded and known models."""
    from teasr_cli.hub import list_models

    table = Table("name", "where", "description")
    for row in list_models():
        table.add_row(*row)
    Console().print(table)


@app.command(epilog="""[bold]Examples[/]\n
  teasr serve                                   [dim]# then open http://127.0.0.1:7860/[/]\n
  teasr serve --port 8000 --device cuda""")
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; anything but loopback is reachable by others (no authentication)."),
    port: int = typer.Option(7860, "--port", "-p", min=0, max=65535, help="Port (0: any free port)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model name, folder or Hub repo (default: the embedded model)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, fp32, bf16 or fp16 (GPU)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for PyTorch (default: all cores)."),
    max_pixels: int = typer.Option(100_000_000, "--max-pixels", min=1, help="Refuse uploads with more pixels than this."),
):
    """Start the local web app: upscale photos, compare before/after, download."""
    try:
        from teasr_cli import serve as webapp
    except ImportError as e:
        fail(f"teasr serve needs the web extra ({(e.name or str(e)).split('.')[0]} is missing): pip install 'teasr\\[serve]'")
    try:
        webapp.run(webapp.ServeConfig(host, port, model, device, dtype, threads, max_pixels),
                   say=lambda msg: console.print(msg, highlight=False, soft_wrap=True),
                   warn=lambda msg: console.print(f"[yellow]warning:[/] {msg}", highlight=False, soft_wrap=True))
    except TeasrError as e:
        fail(str(e))


def main():
    warnings.showwarning = _warn
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()

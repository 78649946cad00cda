"""The `teasr` command line: thin wrappers over the library; the only module that prints.

The library (torch and all) is imported inside the commands, so that `teasr --help`, `--version` and shell
completion, which run this module on every TAB, answer at once.
"""

from __future__ import annotations

import functools
import inspect
import json
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from teasr_cli import __version__
from teasr_cli.errors import ImageWriteError, TeasrError

app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    help="teasr: x4 photo upscaling with an any-step diffusion transformer (TEASR).",
)
console = Console(stderr=True)


class Interrupted(BaseException):
    """Ctrl-C. Not a KeyboardInterrupt, which click turns into its own exit: main() says `interrupted`, exits 130."""


def _interrupt(signum, frame):
    raise Interrupted


def fail(msg: str, code: int = 2):
    console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True, markup=True)
    raise typer.Exit(code)


def say(msg: str) -> None:
    console.print(msg, highlight=False, soft_wrap=True, markup=False)


def warn(msg: str) -> None:
    console.print(f"[yellow]warning:[/] {msg}", highlight=False, soft_wrap=True)


def _warn(message, category, filename, lineno, file=None, line=None):
    warn(str(message))


def _bar(*extra, transient: bool = False) -> Progress:
    """The one progress bar: what, bar, done/total, elapsed, ETA (and any extra columns)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        *extra,
        console=console,
        transient=transient,
    )


def _version(value: bool):
    if value:
        typer.echo(f"teasr {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", "-V", callback=_version, is_eager=True, help="Print the version and exit."
    ),
):
    pass


# ------------------------------------------------------------------ choices (listed in --help, checked by click)


def _choices(name: str, values) -> type[Enum]:
    """A str Enum, which Typer turns into a click.Choice that --help lists. The values copy the library's
    constants (named beside each) rather than import them, which would load torch for every --help and TAB;
    tests/test_cli.py checks that they agree."""
    return Enum(name, {v: v for v in values}, type=str)


ColorFix = _choices("ColorFix", ("wavelet", "adain", "none"))  # pipeline.COLOR_FIXES
DType = _choices("DType", ("auto", "fp32", "bf16", "fp16"))  # "auto" + pipeline.DTYPES
Offload = _choices("Offload", ("none", "model", "sequential"))  # backbones.qwen_image.OFFLOAD_MODES
ImageFormat = _choices("ImageFormat", ("png", "jpg", "jpeg", "webp", "tiff", "tif", "bmp"))  # imageio.SUFFIX_FORMATS


# ------------------------------------------------------------------ shared options, declared once

MODEL_HELP = (
    "Model: a name (see `teasr models`), a local folder, or a Hub repo `org/name\\[@revision]`. "
    "Default: the embedded model."
)
SAMPLING, DEVICE = "Sampling", "Device"
StepsOpt = typer.Option(
    1, "--steps", "-n", min=1, help="Sampling steps: 1 is fastest and most faithful, more adds natural detail."
)
ThreadsOpt = typer.Option(
    None, "--threads", min=1, help="CPU threads for PyTorch (default: all cores).", rich_help_panel=DEVICE
)
DeviceOpt = typer.Option(
    "auto",
    "--device",
    metavar="[auto|cpu|cuda|cuda:N|mps]",
    rich_help_panel=DEVICE,
    help="Where to run (auto: a GPU if there is one).",
)
DtypeOpt = typer.Option(
    DType.auto,
    "--dtype",
    case_sensitive=False,
    rich_help_panel=DEVICE,
    help="auto: bf16 for qwen-image and on CPUs with AMX, else fp32. fp16 is for GPUs.",
)
FormatOpt = typer.Option(
    None, "--format", "-f", case_sensitive=False, help="Output format; default: from the output's suffix."
)
QualityOpt = typer.Option(95, "--quality", min=1, max=100, help="JPEG/WebP quality.")
OverwriteOpt = typer.Option(False, "--overwrite", help="Replace existing output files.")
MaxPixelsOpt = typer.Option(
    None,
    "--max-pixels",
    min=1,
    help="Refuse inputs with more pixels than this (decompression-bomb guard; default 100M).",
)


def _check_scale(value: float | None) -> float | None:
    if value is not None and not 0 < value <= 16:
        raise typer.BadParameter(f"{value:g} is not a scale above 0 and at most 16 (e.g. 2, 3.5 or 0.5)")
    return value


ScaleOpt = typer.Option(
    None,
    "--scale",
    "-s",
    callback=_check_scale,
    help="Output scale, any number (e.g. 2 or 3.5): the model's x4 result resized with Lanczos, "
    "as Real-ESRGAN's --outscale. Default: 4.",
)


ModelOpt = typer.Option(None, "--model", "-m", help=MODEL_HELP)


def _opt(name, annotation, default):
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


SAMPLING_PARAMS = [
    _opt("model", str | None, ModelOpt),
    _opt("seed", int, typer.Option(0, "--seed", help="Noise seed: same seed, same output.", rich_help_panel=SAMPLING)),
    _opt(
        "tile",
        int | None,
        typer.Option(
            None,
            "--tile",
            min=1,
            rich_help_panel=SAMPLING,
            help="Tile size in latent pixels (default: auto from image and memory).",
        ),
    ),
    _opt(
        "tile_overlap",
        int | None,
        typer.Option(
            None,
            "--tile-overlap",
            min=0,
            rich_help_panel=SAMPLING,
            help="Tile overlap in latent pixels (default: a quarter tile).",
        ),
    ),
    _opt(
        "color_fix",
        ColorFix,
        typer.Option(
            ColorFix.wavelet,
            "--color-fix",
            case_sensitive=False,
            rich_help_panel=SAMPLING,
            help="Colour correction toward the input.",
        ),
    ),
    _opt(
        "grid_shift",
        bool,
        typer.Option(
            True,
            "--grid-shift/--no-grid-shift",
            rich_help_panel=SAMPLING,
            help="With several steps, move the patch grid by half a patch on every other step (hides patch seams).",
        ),
    ),
    _opt(
        "anchor",
        bool,
        typer.Option(
            True,
            "--anchor/--no-anchor",
            rich_help_panel=SAMPLING,
            help="With several steps, take what the input's pixel grid can see from the "
            "1-step result (one more pass) and only the finer detail from the N steps: "
            "more faithful.",
        ),
    ),
    _opt(
        "fidelity",
        float,
        typer.Option(
            0.0,
            "--fidelity",
            min=0.0,
            max=1.0,
            rich_help_panel=SAMPLING,
            help="For clean inputs (resized, not blurry, noisy or compressed): keep 1-F "
            "of the added detail and make the output downscale back to the input "
            "exactly. 0 = off; 0.5 is a good start.",
        ),
    ),
    _opt("device", str, DeviceOpt),
    _opt("dtype", DType, DtypeOpt),
    _opt("threads", int | None, ThreadsOpt),
    _opt(
        "offload",
        Offload,
        typer.Option(
            Offload.none,
            "--offload",
            case_sensitive=False,
            rich_help_panel=DEVICE,
            help="Big models: none, model (one of DiT/VAE on the GPU at a time) or "
            "sequential (layer by layer, least memory).",
        ),
    ),
]


@dataclass
class Sampling:
    """The options every command that runs the model takes (see SAMPLING_PARAMS)."""

    model: str | None
    seed: int
    tile: int | None
    tile_overlap: int | None
    color_fix: str
    grid_shift: bool
    anchor: bool
    fidelity: float
    device: str
    dtype: str
    threads: int | None
    offload: str

    def settings(self, steps: int):
        from teasr_cli.pipeline import UpscaleSettings

        return UpscaleSettings(
            steps=steps,
            seed=self.seed,
            tile=self.tile,
            tile_overlap=self.tile_overlap,
            color_fix=self.color_fix,
            grid_shift=self.grid_shift,
            anchor=self.anchor,
            fidelity=self.fidelity,
        )

    def load(self):
        """The Upscaler, after refusing or warning about a dtype this device runs badly."""
        from huggingface_hub.utils import logging as hf_logging

        from teasr_cli.pipeline import Upscaler
        from teasr_cli.runtime import cpu_multiplies_bf16, pick_device

        if self.dtype in ("bf16", "fp16") and pick_device(self.device).type == "cpu":
            if self.dtype == "fp16":
                raise TeasrError(
                    "--dtype fp16 is for GPUs: a CPU emulates it, many times slower than fp32; use --dtype auto or fp32"
                )
            if not cpu_multiplies_bf16():
                warn(
                    "this CPU has no AMX, so bf16 is emulated and runs several times slower than fp32; "
                    "--dtype auto picks the faster one"
                )
        hf_logging.set_verbosity_error()  # the one-line errors say what failed; no retry or cache chatter
        with console.status("loading model..."):
            return Upscaler.from_pretrained(
                self.model, device=self.device, dtype=self.dtype, threads=self.threads, offload=self.offload
            )


def sampling_options(fn):
    """Give a command the SAMPLING_PARAMS options, passed to it as one `opts: Sampling` argument."""
    names = [p.name for p in SAMPLING_PARAMS]
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def command(**kwargs):
        values = {k: kwargs.pop(k) for k in names}
        values = {k: v.value if isinstance(v, Enum) else v for k, v in values.items()}
        return fn(opts=Sampling(**values), **kwargs)

    command.__signature__ = sig.replace(
        parameters=[p for p in sig.parameters.values() if p.name != "opts"] + SAMPLING_PARAMS
    )
    command.__annotations__ = {
        **{k: v for k, v in fn.__annotations__.items() if k != "opts"},
        **{p.name: p.annotation for p in SAMPLING_PARAMS},
    }
    return command


def _same_file(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve() or (b.exists() and a.exists() and a.samefile(b))


def _value(choice) -> str | None:
    return choice.value if isinstance(choice, Enum) else choice


def _tile_progress(bar: Progress, task, up, settings, name: str):
    """Callbacks that size `task` in tiles x passes once the image is read, move it per tile, and name the
    stage that follows sampling (decode, colour fix, encode) so a long tail is not mistaken for a hang."""

    def on_read(pic):
        bar.update(task, completed=0, total=up.work(*pic.size, settings), description=f"upscaling {name}")

    def on_tile(done, total):
        bar.update(
            task,
            completed=done,
            total=total,
            description=f"finishing {name} (decode, colour fix, write)" if done >= total else None,
        )

    return on_read, on_tile


@app.command(
    epilog="""[bold]Examples[/]\n
  teasr upscale photo.jpg                       [dim]# -> photo_x4.jpg, 1 step[/]\n
  teasr upscale photo.jpg -n 4 -o big.png       [dim]# 4 steps: more natural detail[/]\n
  teasr upscale photo.jpg -s 2                  [dim]# -> photo_x2.jpg, exactly twice the size[/]\n
  teasr upscale scan.tif --model org/name@v1 --device cuda --dtype bf16"""
)
@sampling_options
def upscale(
    input: Path = typer.Argument(..., help="Image to upscale (JPEG, PNG, WebP, TIFF, BMP)."),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Output file (default: INPUT + suffix, with the input's extension)."
    ),
    steps: int = StepsOpt,
    scale: float | None = ScaleOpt,
    suffix: str | None = typer.Option(
        None, "--suffix", help="Added to the input's name when no -o is given (default: _x4, or _xS with --scale S)."
    ),
    format: ImageFormat | None = FormatOpt,
    quality: int = QualityOpt,
    overwrite: bool = OverwriteOpt,
    max_pixels: int | None = MaxPixelsOpt,
    *,
    opts: Sampling,
):
    """Upscale one image x4 (or to any --scale)."""
    from teasr_cli import batch as work

    t0 = time.monotonic()
    fmt = _value(format)
    try:
        if not input.is_file():
            raise TeasrError(f"{input}: no such file" if not input.exists() else f"{input}: not a file")
        suffix = f"_x{scale or 4:g}" if suffix is None else suffix
        dst = output or input.with_name(f"{input.stem}{suffix}{work.suffix_for(fmt, input.suffix)}")
        work.check_output(dst, fmt)
        if _same_file(input, dst):
            raise ImageWriteError(f"{dst}: output would overwrite the input; choose another -o")
        if dst.exists() and not overwrite:
            raise ImageWriteError(f"{dst} exists; pass --overwrite to replace it")
        if not dst.parent.exists():
            raise ImageWriteError(f"{dst.parent}: output folder does not exist")
        up = opts.load()
        settings = opts.settings(steps)
        with _bar(transient=True) as bar:
            task = bar.add_task(f"reading {input.name}", total=None)
            on_read, on_tile = _tile_progress(bar, task, up, settings, input.name)
            out = work.upscale_file(
                up, input, dst, settings, scale, fmt, quality, max_pixels, tile_callback=on_tile, on_read=on_read
            )
    except TeasrError as e:
        fail(str(e))
    h, w = out.size
    say(f"wrote {dst} ({w}x{h}) in {time.monotonic() - t0:.0f} s")


@app.command(
    epilog="""[bold]Examples[/]\n
  teasr batch ./photos                          [dim]# -> ./photos_x4/[/]\n
  teasr batch ./photos -o ./big -r --glob '*.jpg' -n 4\n
  teasr batch ./photos -f png                   [dim]# interrupted? run again: finished files are skipped[/]"""
)
@sampling_options
def batch(
    folder: Path = typer.Argument(..., help="Folder of images."),
    outdir: Path | None = typer.Option(
        None, "--output", "-o", help="Output folder (default: FOLDER_x4 beside FOLDER)."
    ),
    recursive: bool = typer.Option(
        False, "--recursive", "-r", help="Include subfolders; the folder tree is kept in the output."
    ),
    glob: str = typer.Option(
        "*", "--glob", "-g", help="Only files matching this pattern, e.g. '*.jpg' (extensions match in any case)."
    ),
    steps: int = StepsOpt,
    scale: float | None = ScaleOpt,
    suffix: str = typer.Option(
        "", "--suffix", help="Added to each output's name (default: none; the output folder tells them apart)."
    ),
    format: ImageFormat | None = FormatOpt,
    quality: int = QualityOpt,
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Redo outputs that exist, also those made with other settings."
    ),
    max_pixels: int | None = MaxPixelsOpt,
    *,
    opts: Sampling,
):
    """Upscale every image in a folder x4; resumes where an interrupted run stopped.

    The settings of each output are recorded beside it (.teasr-batch.jsonl): a re-run with other settings keeps
    the outputs made before and says so (--overwrite redoes them). Under `accelerate launch` (or torchrun) each
    process takes every WORLD_SIZE-th file, on its own GPU.
    """
    from teasr_cli import batch as work

    fmt = _value(format)
    if not folder.is_dir():
        fail(f"{folder}: no such folder")
    outdir = outdir or folder.with_name(folder.resolve().name + "_x4")
    if outdir.resolve() == folder.resolve():
        fail("the output folder is the input folder; choose another -o so no input is overwritten")
    rank, world, local_rank = work.dist_rank()
    if world > 1 and opts.device == "auto":
        import torch

        opts.device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    settings = opts.settings(steps)
    record = work.batch_settings(settings, scale, opts.model, fmt, quality)
    try:
        if fmt:
            work.check_output(Path("x" + work.suffix_for(fmt, ".png")), fmt)
        outdir.mkdir(parents=True, exist_ok=True)
        plan = work.plan(folder, outdir, record, glob, recursive, fmt, suffix, overwrite, rank, world)
        up = opts.load() if plan.todo else None
    except TeasrError as e:
        fail(str(e), code=1 if "no images matching" in str(e) else 2)
    except OSError as e:
        fail(f"cannot create output folder {outdir}: {e.strerror}")
    if plan.stale:
        src, dst, old = plan.stale[0]
        warn(
            f"{len(plan.stale)} output(s) in {outdir} were made with other settings ({dst.name}: "
            f"{work.differences(old, json.loads(json.dumps(record)))}) and are kept; --overwrite redoes them"
        )
    failed: list[tuple[Path, str]] = []
    t0 = time.time()
    if plan.todo:  # a fully resumed batch shows no empty bar
        with _bar() as bar:
            files = bar.add_task("upscaling", total=len(plan.todo))
            for src, dst in plan.todo:
                name = src.name if len(src.name) <= 30 else src.name[:29] + "…"
                tiles = bar.add_task(f"reading {name}", total=None)
                on_read, on_tile = _tile_progress(bar, tiles, up, settings, name)
                try:
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    work.upscale_file(
                        up, src, dst, settings, scale, fmt, quality, max_pixels, tile_callback=on_tile, on_read=on_read
                    )
                    work.record(outdir, dst, record)
                except TeasrError as e:
                    failed.append((src, str(e)))
                except Exception as e:  # one odd file must not stop a long batch; it is reported below
                    failed.append((src, f"{type(e).__name__}: {e}"))
                bar.remove_task(tiles)
                bar.advance(files)
    table = Table(title="teasr batch" + (f" (process {rank + 1}/{world})" if world > 1 else ""), show_header=False)
    table.add_row("upscaled", str(len(plan.todo) - len(failed)))
    table.add_row("skipped (output exists)", str(len(plan.done)))
    if plan.stale:
        table.add_row("kept (other settings)", str(len(plan.stale)))
    table.add_row("failed", str(len(failed)))
    table.add_row("output folder", str(outdir))
    table.add_row("time", f"{time.time() - t0:.1f} s")
    console.print(table)
    for src, msg in failed:
        say(f"failed: {msg if str(src) in msg else f'{src}: {msg}'}")
    if failed:
        raise typer.Exit(1)


def _export(run: Path, output: Path, half: bool, no_ema: bool, lora_rank: int | None, overwrite: bool) -> None:
    import torch

    from teasr_cli import trainer
    from teasr_cli.card import write_model_card

    if output.exists() and not overwrite:
        fail(f"{output} exists; pass --overwrite to replace it, or choose another -o")
    try:
        with console.status("exporting..."):
            folder = trainer.export_checkpoint(
                run, output, use_ema=not no_ema, dtype=torch.float16 if half else None, lora_rank=lora_rank
            )
            write_model_card(folder, run, "fp16" if half else "fp32")
    except TeasrError as e:
        fail(str(e))
    weights = Path(folder) / "model.safetensors"
    size = f", {weights.stat().st_size / 1e6:.0f} MB" if weights.exists() else ""
    say(
        f"exported {folder} ({'fp16' if half else 'fp32'} weights{size}"
        + ("" if half else "; --half stores them in fp16, half the size, loaded back as fp32")
        + ")"
    )


HalfOpt = typer.Option(False, "--half", help="Store the weights in fp16 (half the size; loaded as fp32).")
NoEmaOpt = typer.Option(False, "--no-ema", help="The live weights instead of their EMA.")
LoraRankOpt = typer.Option(
    None,
    "--lora-rank",
    min=1,
    help="Keep the N strongest components of each condition-branch LoRA (truncated SVD), for a smaller file.",
)


@app.command(
    epilog="""[bold]Examples[/]\n
  teasr export runs/sad -o my-model --half      [dim]# then: teasr upscale photo.jpg -m my-model[/]\n
  teasr export runs/sad/ckpt-00002000 -o step2000"""
)
def export(
    run: Path = typer.Argument(..., help="A training run folder (its latest checkpoint) or one ckpt-* folder."),
    output: Path = typer.Option(..., "--output", "-o", help="The model folder to write."),
    half: bool = HalfOpt,
    no_ema: bool = NoEmaOpt,
    lora_rank: int | None = LoraRankOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing model folder."),
):
    """Export a training run to a plain model folder for `teasr upscale -m`, with a model card (README.md) for the
    Hugging Face Hub."""
    _export(run, output, half, no_ema, lora_rank, overwrite)


@app.command(
    epilog="""[bold]Examples[/]\n
  teasr export runs/sad -o my-model --half && teasr push my-model my-org/teasr-photo\n
  HF_TOKEN=hf_... teasr push my-model my-org/teasr-photo --private"""
)
def push(
    folder: Path = typer.Argument(
        ..., help="A model folder (from `teasr export`): config.json, model.safetensors and its README.md card."
    ),
    repo: str = typer.Argument(..., help="Hub repo `org/name\\[@branch]`; created if it does not exist."),
    private: bool = typer.Option(False, "--private", help="Create the repo private."),
    message: str | None = typer.Option(None, "--message", "-m", help="Commit message."),
):
    """Upload an exported model folder to the Hugging Face Hub (token: HF_TOKEN or `hf auth login`)."""
    from huggingface_hub.utils import logging as hf_logging

    from teasr_cli.hub import push_model

    hf_logging.set_verbosity_error()
    try:
        with console.status(f"pushing {folder} to {repo}..."):
            url = push_model(folder, repo, private=private, message=message)
    except TeasrError as e:
        fail(str(e))
    say(f"pushed {folder} to {url}")


@app.command(
    epilog="""[bold]Examples[/]\n
  teasr train --data photos/ --out runs/prior --config train/tiny-cpu.toml --stage prior\n
  teasr train --data photos/ --out runs/sad --stage sad --init runs/prior/model --steps 2000\n
  teasr train --out runs/sad --resume                  [dim]# continue after a kill[/]\n
  accelerate launch -m teasr_cli train ...              [dim]# several GPUs / processes[/]\n
  accelerate launch --config_file train/accelerate/ddp-2gpu.yaml -m teasr_cli train \\\n
      -c train/qwen-image-a100.toml --data lsdir/ --out runs/qwen\n
  teasr export runs/sad -o my-model                    [dim]# plain model folder for `teasr upscale -m`[/]"""
)
def train(
    data: str | None = typer.Option(
        None, "--data", help="HQ images: a folder (recursive), a .txt list, or a Hub dataset id."
    ),
    out: Path | None = typer.Option(None, "--out", help="Run folder: checkpoints, metrics.jsonl, samples/, model/."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Recipe TOML (see train/)."),
    stage: str | None = typer.Option(
        None,
        "--stage",
        help="prior (flow matching, all weights), sad (SAD + TAR, "
        "LoRA) or regress (the one-pass MSE + LPIPS baseline).",
    ),
    backbone: str | None = typer.Option(
        None, "--backbone", help="native (default) or qwen-image (needs a GPU; stage sad)."
    ),
    base: str | None = typer.Option(
        None, "--base", help="qwen-image base: Hub repo org/name\\[@revision] (or 'tiny' for a smoke run)."
    ),
    init: str | None = typer.Option(None, "--init", help="Model folder to start from (the prior, for --stage sad)."),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Optimizer steps."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1),
    grad_accum: int | None = typer.Option(None, "--grad-accum", min=1),
    lr: float | None = typer.Option(None, "--lr"),
    crop: int | None = typer.Option(None, "--crop", help="HQ crop size in pixels."),
    seed: int | None = typer.Option(None, "--seed"),
    mixed_precision: str | None = typer.Option(None, "--mixed-precision", help="no, bf16 or fp16 (GPU)."),
    gradient_checkpointing: bool | None = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing"),
    threads: int | None = ThreadsOpt,
    max_minutes: float | None = typer.Option(
        None, "--max-minutes", min=0, help="Stop (checkpoint + export) after this much wall time."
    ),
    max_cpu_minutes: float | None = typer.Option(
        None,
        "--max-cpu-minutes",
        min=0,
        help="Stop (checkpoint + export) after this much process CPU time, summed over resumes.",
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its latest checkpoint."),
    export: Path | None = typer.Option(
        None,
        "--export",
        help="Deprecated alias of `teasr export RUN -o DIR` (removed in the next release).",
        rich_help_panel="Export (deprecated)",
    ),
    output: Path | None = typer.Option(
        None, "-o", "--output", help="Where --export writes the model folder.", rich_help_panel="Export (deprecated)"
    ),
    half: bool = typer.Option(
        False, "--half", help="With --export: see `teasr export`.", rich_help_panel="Export (deprecated)"
    ),
    no_ema: bool = typer.Option(
        False, "--no-ema", help="With --export: see `teasr export`.", rich_help_panel="Export (deprecated)"
    ),
    lora_rank: int | None = typer.Option(
        None, "--lora-rank", min=1, help="With --export: see `teasr export`.", rich_help_panel="Export (deprecated)"
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="With --export: replace an existing model folder.",
        rich_help_panel="Export (deprecated)",
    ),
):
    """Train with Self-Adversarial Distillation (stage sad) or train the generative prior (stage prior)."""
    from teasr_cli import trainer
    from teasr_cli.data import list_images
    from teasr_cli.sad import LOSS_TERMS

    if export is not None:
        warn("`teasr train --export` is now `teasr export RUN -o DIR`; the alias goes in the next release")
        if output is None:
            fail("--export needs -o MODEL_DIR")
        return _export(export, output, half, no_ema, lora_rank, overwrite)
    try:
        if out is None:
            fail("--out RUN_DIR is required")
        given = dict(
            data=data,
            out=str(out),
            stage=stage,
            init=init,
            backbone=backbone,
            base=base,
            steps=steps,
            batch_size=batch_size,
            grad_accum=grad_accum,
            lr=lr,
            crop=crop,
            seed=seed,
            mixed_precision=mixed_precision,
            threads=threads,
            gradient_checkpointing=gradient_checkpointing,
            max_minutes=max_minutes,
            max_cpu_minutes=max_cpu_minutes,
        )
        if resume and config is None and (out / "train_config.json").exists():
            # The saved recipe with what this command changes: a new session brings a new budget, other cores or a
            # new rate. What the checkpoint's weights were built from cannot change under it.
            saved = json.loads((out / "train_config.json").read_text())
            fixed = ("stage", "init", "backbone", "base")
            clash = [f"--{k}" for k in fixed if given[k] is not None and given[k] != saved.get(k)]
            if clash:
                fail(f"{', '.join(clash)} cannot change on --resume (the checkpoints hold that model); use a new --out")
            cfg = trainer.TrainConfig.load(None, **{**saved, **{k: v for k, v in given.items() if v is not None}})
        else:
            if data is None and not resume:
                fail("--data is required (a folder of HQ images, a .txt list or a Hub dataset id)")
            cfg = trainer.TrainConfig.load(str(config) if config else None, **given)
        list_images(cfg.data)  # a bad --data fails here, before any progress bar
    except TeasrError as e:
        fail(str(e))
    stop = {"now": False}

    def on_signal(signum, frame):
        if stop["now"]:
            raise Interrupted
        stop["now"] = True
        say("stopping after this step (checkpoint kept; --resume continues); press Ctrl-C again to abort")

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with _bar(TextColumn("{task.fields[info]}")) as bar:
        task = bar.add_task(f"{cfg.stage}", total=cfg.steps, info="")

        def on_log(rec):
            if "step" in rec and "loss" in rec:
                terms = " ".join(f"{k} {rec[k]:.4f}" for k in LOSS_TERMS if k in rec)
                bar.update(task, completed=rec["step"], info=f"{terms} | {rec['it_s']:.2f} it/s")
            elif rec.get("event") == "export":
                bar.update(task, completed=rec["step"])

        try:
            folder = trainer.train(cfg, resume=resume, callback=on_log, stop=lambda: stop["now"])
        except TeasrError as e:
            fail(str(e))
    if stop["now"]:
        say(f"stopped; resume with: teasr train --out {out} --resume")
        raise typer.Exit(130)
    say(f"done: model in {folder} (log: {out / 'metrics.jsonl'})")


METRIC_FORMATS = {"psnr": "{:.2f}", "ssim": "{:.4f}", "niqe": "{:.3f}", "fid": "{:.2f}"}  # as papers print them


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


@app.command(
    "eval",
    epilog="""[bold]Examples[/]\n
  teasr eval --dataset realsr --steps 1,2,4,8        [dim]# StableSR test set, downloaded once[/]\n
  teasr eval --lq my_lr/ --hq my_hr/ --steps 1,4     [dim]# any folder pair, names matched[/]\n
  teasr eval --hq photos/ --degrade realesrgan --limit 20 --metrics psnr,lpips\n
  [dim]killed? run the same command again: finished images are not recomputed[/]""",
)
@sampling_options
def eval_(
    dataset: str | None = typer.Option(
        None,
        "--dataset",
        "-d",
        help="realsr, drealsr or div2k-val: the StableSR test sets, downloaded from the Hugging Face Hub on first use.",
    ),
    lq: Path | None = typer.Option(None, "--lq", help="Folder of LQ images, paired by name with --hq."),
    hq: Path | None = typer.Option(None, "--hq", help="Folder of HQ (ground-truth) images, 4x the LQ."),
    degrade: str | None = typer.Option(
        None, "--degrade", help="Make each LQ from its --hq image: bicubic, mild or realesrgan."
    ),
    degrade_seed: int = typer.Option(
        0, "--degrade-seed", help="Seed of the --degrade draws (per image: seed and index)."
    ),
    steps: str = typer.Option("1,2,4,8", "--steps", "-n", help="Step counts to evaluate, comma-separated."),
    baseline: str = typer.Option(
        "bicubic,lanczos",
        "--baseline",
        help="Baseline rows, comma-separated: bicubic, "
        "lanczos, realesrgan (Real-ESRGAN x4plus, optional package), hr (the ground truth itself: "
        "its NIQE is the photos' own) or none.",
    ),
    metrics: str | None = typer.Option(
        None,
        "--metrics",
        help="Metrics, comma-separated: psnr, ssim, lpips, "
        "lpips-vgg, dists, niqe, fid. Default: psnr, ssim, lpips, dists, niqe, and "
        "fid from 300 images on (FID needs many images to mean anything).",
    ),
    crop_border: int = typer.Option(
        0, "--crop-border", min=0, help="Pixels cropped from each border for PSNR/SSIM (0 as pyiqa; BasicSR uses 4)."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Results folder (default eval_results/<dataset>)."),
    save_images: bool = typer.Option(False, "--save-images", help="Also save every SR image under OUT/images/."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Only the first N images (quick checks)."),
    *,
    opts: Sampling,
):
    """Benchmark the model against ground truth: PSNR, SSIM, LPIPS, DISTS, NIQE, FID per step count."""
    from teasr_cli import benchsets
    from teasr_cli import evaluation as ev

    try:
        step_list = ev.parse_steps(steps)
        baselines = ev.parse_list(baseline, ev.BASELINES, "baseline")
        metric_list = None if metrics is None else ev.parse_list(metrics, ev.available_metrics(), "metric")
        if metric_list == []:
            raise ev.EvalError("--metrics none leaves nothing to measure; name at least one metric")
        pairs, label, data = benchsets.resolve_pairs(dataset, lq, hq, degrade, degrade_seed)
        pairs = pairs[:limit] if limit else pairs
        metric_list = metric_list or ev.default_metrics(len(pairs))  # FID from FID_MIN_IMAGES on
        benchsets.check_sizes(pairs)  # a wrong-size pair fails now, not after an hour of sampling
        up = opts.load()
        baseline_methods = [ev.baseline(b) for b in baselines]  # an uninstalled optional baseline fails here
    except TeasrError as e:
        fail(str(e))
    out = out or Path("eval_results") / label
    settings = {
        "seed": opts.seed,
        "tile": opts.tile,
        "tile_overlap": opts.tile_overlap,
        "color_fix": opts.color_fix,
        "grid_shift": opts.grid_shift,
        "anchor": opts.anchor,
        "fidelity": opts.fidelity,
    }
    dtype = up.dtype_name  # what "auto" chose here
    methods = [
        ev.Method(
            f"teasr {s} step{'s' if s > 1 else ''}",
            _teasr_fn(up, opts.settings(s)),
            s,
            {**settings, "steps": s, **_model_id(up), "dtype": dtype, "device": up.device.type},
        )
        for s in step_list
    ] + baseline_methods
    config = {
        "dataset": label,
        "data": data,
        "model": str(opts.model or "default"),
        "model_folder": str(up.folder),
        "steps": step_list,
        "seed": opts.seed,
        "degrade": degrade,
        "degrade_seed": degrade_seed if degrade else None,
        "baselines": baselines,
        "color_fix": opts.color_fix,
        "anchor": opts.anchor,
        "fidelity": opts.fidelity,
        "dtype": dtype,
        "device": up.device.type,
    }
    with _bar() as bar:
        task = bar.add_task("evaluating", total=len(pairs))

        def on_progress(done, total, what):
            bar.update(task, completed=done, description=f"{what[:36]:36}")

        try:
            res = ev.evaluate(
                pairs, methods, metric_list, out, save_images, on_progress, config, crop_border, device=up.device
            )
        except TeasrError as e:
            bar.remove_task(task)  # so the error below is the last and only line left
            error = f"{e} (finished images are kept in {out / ev.PER_IMAGE}; run again to resume)"
        else:
            error = None
    if error:
        fail(error)
    Console().print(_eval_table(res, f"teasr eval: {label} ({len(pairs)} images)"))
    for k, why in res.unavailable.items():
        console.print(f"[yellow]{k}:[/] n/a, {why}", highlight=False, soft_wrap=True)
    resumed = len(pairs) * len(methods) - res.computed
    say(
        f"wrote {out / 'results.json'}, results.csv and metrics_vs_steps.png"
        + (f" ({resumed} of {len(pairs) * len(methods)} results resumed)" if resumed else "")
    )


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


@app.command(
    epilog="""[bold]Examples[/]\n
  teasr serve                                   [dim]# then open http://127.0.0.1:7860/[/]\n
  teasr serve --port 8000 --device cuda"""
)
def serve(
    host: str = typer.Option(
        "127.0.0.1",
        "--host",
        help="Address to listen on; anything but loopback is reachable by others (no authentication).",
    ),
    port: int = typer.Option(7860, "--port", "-p", min=0, max=65535, help="Port (0: any free port)."),
    model: str | None = ModelOpt,
    device: str = DeviceOpt,
    dtype: DType = DtypeOpt,
    threads: int | None = ThreadsOpt,
    max_pixels: int = typer.Option(
        100_000_000, "--max-pixels", min=1, help="Refuse uploads with more pixels than this."
    ),
):
    """Start the local web app: upscale photos, compare before/after, download."""
    try:
        from teasr_cli import serve as webapp
    except ImportError as e:
        fail(
            f"teasr serve needs the web extra ({(e.name or str(e)).split('.')[0]} is missing): "
            "pip install 'teasr\\[serve]'"
        )
    try:
        webapp.run(
            webapp.ServeConfig(host, port, model, device, _value(dtype), threads, max_pixels),
            say=lambda msg: console.print(msg, highlight=False, soft_wrap=True),
            warn=lambda msg: console.print(f"[yellow]warning:[/] {msg}", highlight=False, soft_wrap=True),
        )
    except TeasrError as e:
        fail(str(e))


def main():
    warnings.showwarning = _warn
    signal.signal(signal.SIGINT, _interrupt)
    try:
        app()
    except (Interrupted, KeyboardInterrupt):  # outputs are written atomically: nothing is left behind
        say("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()

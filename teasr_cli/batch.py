"""Planning and doing the work of `teasr upscale` and `teasr batch`, without printing.

A batch is planned before any model is loaded: which files match, where each output goes, which outputs an
earlier (interrupted) run already made with the same settings, which it made with other settings, and which
share of the list this process takes under `accelerate launch`. Each written output is recorded, with the
settings that made it, in RECORD beside the outputs, so a re-run with other settings is told apart from a resume.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import torch

from teasr_cli.errors import ImageWriteError, TeasrError
from teasr_cli.imageio import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    SUFFIX_FORMATS,
    Picture,
    find_images,
    output_format,
    read_image,
    replace_pixels,
    upscale_alpha,
    write_image,
)

RECORD = ".teasr-batch.jsonl"  # one JSON line per output written: {"output": relative path, "settings": {...}}
FORMAT_SUFFIXES = {"jpeg": ".jpg", "tif": ".tiff"}  # --format names whose file suffix differs


def suffix_for(fmt: str | None, default: str) -> str:
    """The file suffix an output in format `fmt` gets (the input's own suffix when no format is asked for)."""
    if not fmt:
        return default
    fmt = fmt.lower().lstrip(".")
    return FORMAT_SUFFIXES.get(fmt, "." + fmt)


def check_output(dst: Path, fmt: str | None) -> None:
    """Refuse an output name whose image suffix says another format than --format (JPEG bytes in a .png)."""
    asked = output_format(dst, fmt)  # an unknown format or suffix fails here, before minutes of sampling
    if fmt and dst.suffix.lower() in SUFFIX_FORMATS and SUFFIX_FORMATS[dst.suffix.lower()] != asked:
        raise ImageWriteError(
            f"{dst} has the suffix of another format than --format {fmt}; "
            f"name it {dst.with_suffix(suffix_for(fmt, dst.suffix)).name} or drop --format"
        )


def dist_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) when started by `accelerate launch` / torchrun, else (0, 1, 0)."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def _fold(path: str) -> str:
    """Lower-case an image suffix (".PNG" -> ".png"), the only part of a name matched case-insensitively."""
    stem, dot, ext = path.rpartition(".")
    return f"{stem}.{ext.lower()}" if dot and "." + ext.lower() in IMAGE_SUFFIXES else path


def matches(rel: PurePosixPath, pattern: str) -> bool:
    """Glob `pattern` against a path relative to the batch folder, from the right as Path.match does, with
    image suffixes compared case-insensitively: '*.png' takes UPPER.PNG, as users of Windows and macOS expect."""
    return rel.match(pattern) or PurePosixPath(_fold(str(rel))).match(_fold(pattern))


def list_inputs(folder: Path, pattern: str = "*", recursive: bool = False, exclude: Path | None = None) -> list[Path]:
    """The images under `folder` to upscale, sorted (so every process of a sharded run sees the same list)."""
    files = find_images(folder, "*", recursive, exclude)  # never re-upscale our own outputs
    return [p for p in files if matches(PurePosixPath(p.relative_to(folder).as_posix()), pattern)]


@dataclass
class Plan:
    outdir: Path
    jobs: list[tuple[Path, Path]]  # this process's share: (input, output)
    todo: list[tuple[Path, Path]]  # what this run upscales
    done: list[tuple[Path, Path]] = field(default_factory=list)  # output exists (same or unrecorded settings)
    stale: list[tuple[Path, Path, dict]] = field(default_factory=list)  # output made with other settings: kept
    rank: int = 0
    world: int = 1


def plan(
    folder: Path,
    outdir: Path,
    settings: dict,
    pattern: str = "*",
    recursive: bool = False,
    fmt: str | None = None,
    suffix: str = "",
    overwrite: bool = False,
    rank: int = 0,
    world: int = 1,
) -> Plan:
    """What one process of a batch does. `settings` (JSON-able) are compared with those recorded for each
    existing output: outputs made with other settings are kept and listed in `stale` unless `overwrite`."""
    files = list_inputs(folder, pattern, recursive, outdir)
    if not files:
        raise TeasrError(
            f"no images matching {pattern!r} in {folder}" + ("" if recursive else " (use -r for subfolders)")
        )
    jobs = [
        (src, outdir / src.relative_to(folder).with_name(src.stem + suffix + suffix_for(fmt, src.suffix)))
        for src in files
    ]
    seen: dict[Path, Path] = {}
    for src, dst in jobs:
        if dst in seen:  # a.jpg and a.png with -f png, say: the second would silently replace the first
            raise TeasrError(
                f"{seen[dst].name} and {src.name} would both be written to {dst}; "
                "use -f with their own format, or move one of them"
            )
        seen[dst] = src
    jobs = jobs[rank::world]  # shard the sorted list before skipping, so no file is ever done twice
    records = read_records(outdir)
    settings = json.loads(json.dumps(settings))  # compare as they are stored (tuples become lists, ...)
    p = Plan(outdir, jobs, [], rank=rank, world=world)
    for src, dst in jobs:
        made_with = records.get(dst.relative_to(outdir).as_posix())
        if overwrite or not dst.exists():
            p.todo.append((src, dst))
        elif made_with is not None and made_with != settings:
            p.stale.append((src, dst, made_with))
        else:
            p.done.append((src, dst))
    return p


def differences(old: dict, new: dict) -> str:
    """'steps 1 -> 4, seed 0 -> 3': what changed between two settings records."""
    keys = [k for k in dict.fromkeys([*old, *new]) if old.get(k) != new.get(k)]
    return ", ".join(f"{k} {old.get(k)} -> {new.get(k)}" for k in keys)


def read_records(outdir: Path) -> dict[str, dict]:
    """{relative output path: settings} from RECORD; the last line for an output wins, a torn line is skipped."""
    try:
        lines = (Path(outdir) / RECORD).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return {}
    records = {}
    for line in lines:
        try:
            rec = json.loads(line)
            records[rec["output"]] = rec["settings"]
        except (ValueError, KeyError, TypeError):  # a run killed mid-append leaves at most one torn line
            continue
    return records


def record(outdir: Path, dst: Path, settings: dict) -> None:
    """Append one line for a finished output. One write of one short line in append mode: the processes of a
    sharded run can share the file without a lock."""
    line = json.dumps({"output": dst.relative_to(outdir).as_posix(), "settings": settings}) + "\n"
    with open(Path(outdir) / RECORD, "a", encoding="utf-8") as f:
        f.write(line)


def batch_settings(settings, scale: float | None, model: str | None, fmt: str | None, quality: int) -> dict:
    """Everything that changes an output's pixels or bytes, as recorded beside a batch's outputs."""
    return {**asdict(settings), "scale": scale, "model": model or "default", "format": fmt, "quality": quality}


# ---------------------------------------------------------------- the work on one file


def output_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """(H, W) of an input of `size` (H, W) upscaled by `scale`, rounded to whole pixels."""
    return tuple(max(1, round(n * scale)) for n in size)


def resize(pic: Picture, size: tuple[int, int]) -> Picture:
    """The picture resized to `size` (H, W) with Lanczos on float pixels (no 8-bit rounding in between, and
    antialiased when it shrinks), as Real-ESRGAN's --outscale resizes its x4 result."""
    if pic.size == tuple(size):
        return pic
    rgb = torch.cat([upscale_alpha(c[None], size) for c in pic.rgb])  # upscale_alpha: Lanczos per float channel
    return replace_pixels(pic, rgb)


def upscale_file(
    up,
    src: Path,
    dst: Path,
    settings,
    scale: float | None = None,
    fmt: str | None = None,
    quality: int = 95,
    max_pixels: int | None = None,
    callback=None,
    tile_callback=None,
    on_read=None,
) -> Picture:
    """Read `src`, upscale it (x the model's scale, then resized to `scale` if another is asked for) and write
    `dst` atomically. on_read(picture) runs before the model does (e.g. to size a progress bar)."""
    pic = read_image(src, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
    if on_read is not None:
        on_read(pic)
    out = up.upscale_picture(pic, settings, callback, tile_callback)
    if scale is not None and scale != up.scale:
        out = resize(out, output_size(pic.size, scale))
    write_image(out, dst, fmt=fmt, quality=quality, overwrite=True)
    return out

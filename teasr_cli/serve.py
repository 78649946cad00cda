"""`teasr serve`: a local web app around one Upscaler: upload, queue, live progress, before/after, download.

A small ASGI app (Starlette on uvicorn) serves one static page (static/, no CDN: it works offline) and a JSON API
the page polls. One worker thread runs the jobs one at a time on the one model in memory, reporting per tile and
step through the pipeline's callbacks; a cancel is noticed between tiles. Uploads and results live only in a temp
folder the app owns, removed at exit. Nothing here prints: `say` and `warn` come from the CLI.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from teasr_cli.errors import TeasrError
from teasr_cli.imageio import DEFAULT_MAX_PIXELS, SUFFIX_FORMATS, read_image, to_pil, write_image
from teasr_cli.pipeline import COLOR_FIXES, Upscaler, UpscaleSettings

STATIC = Path(__file__).with_name("static")
MAX_STEPS = 8
MAX_UPLOAD = 2**30  # bytes; far above any photo under the default pixel limit
BROWSER_SHOWS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}  # other formats get a PNG preview
FORMAT_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "TIFF": ".tiff", "BMP": ".bmp"}


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 7860  # Gradio's default: where people expect a local model demo
    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS


class Cancelled(Exception):
    """Raised from the tile callback to stop a running job."""


@dataclass
class Job:
    id: str
    session: str  # the browser tab that made it: each tab lists its own results
    name: str  # the uploaded file's name, for messages and the download's name
    settings: UpscaleSettings
    folder: Path  # this job's folder in the app's temp folder
    src: Path
    out: Path
    in_size: tuple[int, int]  # (W, H)
    state: str = "queued"  # queued, running, done, failed, cancelled
    step: int = 0
    steps: int = 0
    tiles: int = 0
    tiles_total: int = 0
    error: str | None = None
    seconds: float | None = None
    out_size: tuple[int, int] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def download_name(self) -> str:
        return f"{Path(self.name).stem}_x4{self.out.suffix}"

    def preview(self, path: Path) -> Path:
        """What the page shows for `path`: the file itself, or a PNG beside it where browsers cannot (TIFF)."""
        return path if path.suffix in BROWSER_SHOWS else path.with_name(path.stem + "-preview.png")


class JobQueue:
    """Jobs in arrival order, run one at a time by one worker thread: one model in memory, no contention."""

    def __init__(self, up: Upscaler, max_pixels: int):
        self.up, self.max_pixels = up, max_pixels
        self.jobs: dict[str, Job] = {}
        self.waiting: list[Job] = []
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="teasr-serve-worker", daemon=True)

    def start(self):
        self.thread.start()

    def submit(self, job: Job):
        with self.cond:
            self.jobs[job.id] = job
            self.waiting.append(job)
            self.cond.notify()

    def place(self, job: Job) -> int | None:
        """1 for the next job to run (one is running before it), 2 after that, ...; None unless queued."""
        with self.cond:
            return self.waiting.index(job) + 1 if job in self.waiting else None

    def cancel(self, job: Job):
        with self.cond:
            if job in self.waiting:
                self.waiting.remove(job)
                job.state = "cancelled"
            elif job.state == "running":
                job.cancel.set()  # seen by the tile callback

    def stop(self, timeout: float = 60.0):
        with self.cond:
            self.stopping = True
            for job in self.waiting:
                job.state = "cancelled"
            self.waiting.clear()
            self.cond.notify_all()
        self.thread.join(timeout)

    def _loop(self):
        while True:
            with self.cond:
                while not self.waiting and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    return
                job = self.waiting.pop(0)
                job.state = "running"
            self._run(job)

    def _run(self, job: Job):
        def on_step(i, n, z):
            job.step, job.steps = i, n

        def on_tile(done, total):
            job.tiles, job.tiles_total = done, total
            if job.cancel.is_set() or self.stopping:
                raise Cancelled

        t0 = time.perf_counter()
        try:
            # the same calls as `teasr upscale`, so the download is the CLI's file byte for byte
            out = self.up.upscale_picture(read_image(job.src, self.max_pixels), job.settings, on_step, on_tile)
            write_image(out, job.out, quality=95)
            if job.preview(job.out) != job.out:
                to_pil(out).save(job.preview(job.out))
            job.out_size = (out.size[1], out.size[0])
            job.seconds = time.perf_counter() - t0
            job.state = "done"
        except Cancelled:
            job.state = "cancelled"
        except TeasrError as e:
            job.error, job.state = _user_message(str(e), job), "failed"
        except Exception as e:  # e.g. out of memory on a huge photo: that job fails, the server keeps serving
            job.error, job.state = f"{job.name}: {type(e).__name__}: {e}", "failed"


def _user_message(msg: str, job: Job) -> str:
    """Messages name the file as the user knows it, not the temp path it was saved under."""
    return msg.replace(str(job.src), job.name)


def _safe_suffix(name: str) -> str:
    suffix = Path(name).suffix.lower()
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,5}", suffix) else ""


def parse_settings(q) -> UpscaleSettings:
    """Query parameters -> settings; a bad value is a ValueError with the message the page shows."""

    def number(key, kind, default, lo, hi):
        raw = q.get(key, "")
        try:
            v = kind(raw) if raw != "" else default
        except ValueError:
            raise ValueError(f"{key} must be a number, not {raw!r}") from None
        if not lo <= v <= hi:
            raise ValueError(f"{key} must be between {lo} and {hi}, not {v}")
        return v

    color = q.get("color_fix", "wavelet")
    if color not in COLOR_FIXES:
        raise ValueError(f"colour fix must be one of {', '.join(COLOR_FIXES)}, not {color!r}")
    return UpscaleSettings(
        steps=number("steps", int, 1, 1, MAX_STEPS),
        seed=number("seed", int, 0, 0, 2**63 - 1),
        fidelity=number("fidelity", float, 0.0, 0.0, 1.0),
        color_fix=color,
    )


def job_json(job: Job, queue: JobQueue) -> dict:
    s = job.settings
    return {
        "id": job.id,
        "name": job.name,
        "state": job.state,
        "place": queue.place(job),
        "step": job.step,
        "steps": job.steps,
        "tiles": job.tiles,
        "tiles_total": job.tiles_total,
        "error": job.error,
        "seconds": job.seconds,
        "in_size": job.in_size,
        "out_size": job.out_size,
        "settings": {"steps": s.steps, "seed": s.seed, "fidelity": s.fidelity, "color_fix": s.color_fix},
        "download_name": job.download_name,
    }


def _error(msg: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": msg}, status_code=status)


def build_app(queue: JobQueue, workdir: Path, info: dict) -> Starlette:
    """The ASGI app: the page, and the API it polls. `workdir` is the only place files are written."""

    def find(request: Request) -> Job | None:
        return queue.jobs.get(request.path_params["job_id"])

    async def index(request: Request):
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def get_info(request: Request):
        return JSONResponse(info)

    async def list_jobs(request: Request):
        session = request.query_params.get("session", "")
        return JSONResponse([job_json(j, queue) for j in list(queue.jobs.values()) if j.session == session])

    async def create_job(request: Request):
        q = request.query_params
        name = Path(q.get("name", "")).name[:200] or "image"
        try:
            settings = parse_settings(q)
        except ValueError as e:
            return _error(f"{name}: {e}")
        job_id = secrets.token_hex(8)
        folder = workdir / job_id
        folder.mkdir()
        suffix = _safe_suffix(name)
        src = folder / f"input{suffix}"
        size = 0
        with open(src, "wb") as f:
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_UPLOAD:
                    break
                f.write(chunk)
        if size > MAX_UPLOAD:
            shutil.rmtree(folder)
            return _error(f"{name}: the file is over {MAX_UPLOAD >> 20} MiB; upscale it with `teasr upscale`", 413)
        try:  # decode it now, so a bad file is refused at once rather than when its turn comes
            pic = await run_in_threadpool(read_image, src, queue.max_pixels)
        except TeasrError as e:
            shutil.rmtree(folder)
            return _error(str(e).replace(str(src), name))
        out_suffix = suffix if suffix in SUFFIX_FORMATS else FORMAT_SUFFIX.get(pic.format, ".png")
        job = Job(
            job_id,
            q.get("session", ""),
            name,
            settings,
            folder,
            src,
            folder / f"output{out_suffix}",
            (pic.size[1], pic.size[0]),
        )
        if job.preview(src) != src:
            await run_in_threadpool(lambda p=pic: to_pil(p).save(job.preview(src)))
        del pic
        queue.submit(job)
        return JSONResponse(job_json(job, queue))

    async def get_job(request: Request):
        job = find(request)
        return JSONResponse(job_json(job, queue)) if job else _error("no such job", 404)

    async def cancel_job(request: Request):
        if not (job := find(request)):
            return _error("no such job", 404)
        queue.cancel(job)
        return JSONResponse(job_json(job, queue))

    async def input_image(request: Request):
        job = find(request)
        return FileResponse(job.preview(job.src)) if job else _error("no such job", 404)

    async def result_image(request: Request):
        job = find(request)
        if not job or job.state != "done":
            return _error("no result for this job", 404)
        return FileResponse(job.preview(job.out))

    async def download(request: Request):
        job = find(request)
        if not job or job.state != "done":
            return _error("no result for this job", 404)
        return FileResponse(job.out, filename=job.download_name)

    routes = [
        Route("/", index),
        Route("/api/info", get_info),
        Route("/api/jobs", list_jobs),
        Route("/api/jobs", create_job, methods=["POST"]),
        Route("/api/jobs/{job_id}", get_job),
        Route("/api/jobs/{job_id}/cancel", cancel_job, methods=["POST"]),
        Route("/api/jobs/{job_id}/input", input_image),
        Route("/api/jobs/{job_id}/result", result_image),
        Route("/api/jobs/{job_id}/download", download),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """Bind before loading the model, so a taken port fails in a second with one line."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as e:
        raise TeasrError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        hint = "; choose another --port" if e.errno in (98, 48, 10048) else ""
        raise TeasrError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None
    return sock


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run(cfg: ServeConfig, say: Callable[[str], None], warn: Callable[[str], None]) -> None:
    """Serve until Ctrl-C (or SIGTERM); then stop the worker and remove the temp folder."""
    sock = listen(cfg.host, cfg.port)
    try:
        if not is_loopback(cfg.host):
            warn(
                f"listening on {cfg.host}: anyone who can reach this machine can use the app and its files; "
                "there is no authentication"
            )
        up = Upscaler.from_pretrained(cfg.model, device=cfg.device, dtype=cfg.dtype, threads=cfg.threads)
        with tempfile.TemporaryDirectory(prefix="teasr-serve-") as tmp:
            queue = JobQueue(up, cfg.max_pixels)
            info = {
                "model": str(cfg.model or "default"),
                "device": up.device.type,
                "dtype": up.dtype_name,
                "max_pixels": cfg.max_pixels,
                "max_steps": MAX_STEPS,
                "color_fixes": list(COLOR_FIXES),
            }
            app = build_app(queue, Path(tmp), info)
            host, port = sock.getsockname()[:2]
            shown = "127.0.0.1" if not is_loopback(host) else host  # 0.0.0.0 is not an address to open
            url = f"http://{f'[{shown}]' if ':' in shown else shown}:{port}/"
            server = uvicorn.Server(
                uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
            )
            # uvicorn catches SIGINT/SIGTERM, shuts down, then re-raises the signal with the handler found
            # before it: make that one raise KeyboardInterrupt, so a `kill` stops as a Ctrl-C does (exit 0)
            previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
            queue.start()
            say(f"teasr serve: open {url}  (model {info['model']} on {info['device']}; Ctrl-C stops)")
            say(f"files are kept in {tmp} until exit")
            try:
                server.run(sockets=[sock])
            except KeyboardInterrupt:
                pass
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
                queue.stop()
        say("stopped; temp folder removed")
    finally:
        sock.close()

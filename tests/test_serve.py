"""`teasr serve` end to end: a real server process with the embedded model, driven by a real headless Chromium
(Debian's chromium + chromium-driver, installed by .ci/run; nothing downloads a browser)."""

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import small_photo
from PIL import Image

from teasr_cli.pipeline import Upscaler, UpscaleSettings
from teasr_cli.tiling import TiledVelocity

pytest.importorskip("starlette", reason="the [serve] extra is not installed")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (in the [serve] test deps) is not installed")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
FAST = ["--device", "cpu", "--threads", "1"]  # one thread: the CLI and the server compute the same bytes
ENV = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}


class Server:
    """`teasr serve` as a subprocess on a free port (--port 0), its stderr read line by line."""

    def __init__(self, *args):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "teasr_cli", "serve", "--port", "0", *FAST, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        self.lines: queue.Queue = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self.expect("open http")[1].split("open ")[1].split()[0]
        self.tmp = Path(self.expect("files are kept in")[1].split("kept in ")[1].split(" until")[0])

    def _read(self):
        for line in self.proc.stderr:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, text, timeout=120):
        """Wait for a stderr line containing text; returns (lines read so far, that line)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                break
            self.log.append(line)
            if text in line:
                return self.log, line
        raise AssertionError(f"no {text!r} from teasr serve; it said:\n" + "\n".join(self.log))

    def api(self, path, data=None, **params):
        """(status, JSON) of one API call."""
        url = self.url + path.lstrip("/") + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
            with urllib.request.urlopen(req) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self, sig=signal.SIGINT):
        """Ctrl-C (or a kill): the process ends on its own; returns its exit code."""
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=60)
        rest = []
        while (line := self.lines.get(timeout=10)) is not None:
            rest.append(line)
        self.log += rest
        return rc


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Real photos (skimage.data) small enough for a few seconds per job, a corrupt file, a 200 MP PNG."""
    d = tmp_path_factory.mktemp("photos")
    small_photo("chelsea", (64, 64)).save(d / "cat.png")
    small_photo("astronaut", (64, 64)).save(d / "astronaut.png")
    small_photo("coffee", (48, 40)).save(d / "coffee.jpg", quality=92)
    small_photo("rocket", (40, 48)).save(d / "rocket.png")
    (d / "corrupt.jpg").write_bytes((d / "coffee.jpg").read_bytes()[:300])  # cut off in the middle of the scan
    Image.new("1", (20000, 10000)).save(d / "huge.png")  # 200 MP, a ~30 KB file
    return d


def cli_upscale(src: Path, out: Path, steps: int) -> bytes:
    subprocess.run(
        [sys.executable, "-m", "teasr_cli", "upscale", str(src), "-o", str(out), "--steps", str(steps), *FAST],
        check=True,
        capture_output=True,
        env=ENV,
    )
    return out.read_bytes()


def until(fn, timeout=120):
    """Poll fn() until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    while not (value := fn()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return value


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    rc = s.stop(signal.SIGTERM)  # a kill cleans up as Ctrl-C does (tested below)
    assert rc == 0 and "stopped; temp folder removed" in s.log[-1], s.log
    assert not s.tmp.exists()
    assert not any("Traceback" in line for line in s.log), s.log


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.fail(
            "the browser tests need Debian's chromium and chromium-driver: apt-get install chromium "
            "chromium-driver (.ci/run does)"
        )
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1280,800",
        "--disable-gpu",
        "--no-first-run",
    ):
        opts.add_argument(arg)
    opts.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)  # explicit paths: no driver download
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    yield driver
    driver.quit()


def wait(driver, fn, timeout=120, what="the page"):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: fn(d), message=f"waiting for {what}")


def open_page(driver, url):
    driver.get(url)
    wait(driver, lambda d: d.find_element(By.ID, "model-info").text, what="the model line")


def submit(driver, *files, steps=1, run=True):
    """Pick files, set the steps and (with run) press Upscale."""
    driver.execute_script("document.getElementById('file-input').value = ''")  # chromedriver adds to a multiple input
    driver.find_element(By.ID, "file-input").send_keys("\n".join(str(f) for f in files))
    driver.execute_script(
        "const s = document.getElementById('steps'); s.value = arguments[0];s.dispatchEvent(new Event('input'));", steps
    )
    if run:
        driver.find_element(By.ID, "run").click()


def cards(driver):
    """{file name: card element} of this tab's jobs."""
    return {c.find_element(By.CSS_SELECTOR, ".name").text: c for c in driver.find_elements(By.CSS_SELECTOR, ".job")}


def state(driver, name):
    c = cards(driver).get(name)
    return c and c.get_attribute("data-state")


def px(style: str) -> float:
    return float(style.removesuffix("px"))


# ------------------------------------------------------------------ without a browser


def test_serve_without_the_extra_names_the_extra_to_install():
    code = (
        "import sys; sys.modules['starlette'] = None; sys.argv = ['teasr', 'serve']; "
        "from teasr_cli.cli import main; main()"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "pip install 'teasr[serve]'" in r.stderr, r.stderr


def test_tile_callback_counts_every_tile_of_every_pass_and_can_stop_the_run(tiny_model_dir):
    up = Upscaler.from_pretrained(str(tiny_model_dir), device="cpu")
    calls = []
    lq = torch.rand(1, 3, 40, 48)
    up.upscale_tensor(
        lq, UpscaleSettings(steps=3, tile=8, tile_batch=3), tile_callback=lambda d, n: calls.append((d, n))
    )
    n_tiles = len(TiledVelocity(None, 8, 2).grid(40, 48)[0])  # the tiny model's latent is the input's size
    assert n_tiles > 3
    total = n_tiles * 4  # 3 steps and the anchor pass
    assert calls[-1] == (total, total) and all(n == total for _, n in calls)
    assert [d for d, _ in calls] == sorted({d for d, _ in calls}) and len(calls) == 4 * -(-n_tiles // 3)

    def stop(done, total):
        if done >= 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        up.upscale_tensor(lq, UpscaleSettings(steps=2, tile=8, tile_batch=1), tile_callback=stop)


def test_api_refuses_bad_settings_and_unknown_jobs(server, photos):
    body = (photos / "cat.png").read_bytes()
    for params, words in [
        ({"steps": 9}, "steps must be between 1 and 8"),
        ({"steps": "x"}, "steps must be a number"),
        ({"fidelity": 2}, "fidelity must be between"),
        ({"color_fix": "sepia"}, "colour fix"),
    ]:
        status, data = server.api("/api/jobs", body, name="cat.png", session="api", **params)
        assert status == 400 and data["error"].startswith("cat.png: ") and words in data["error"], data
    assert server.api("/api/jobs/nope")[0] == 404 and server.api("/api/jobs/nope/download")[0] == 404
    status, data = server.api("/api/jobs", b"", name="empty.png", session="api")
    assert status == 400 and "empty" in data["error"] and str(server.tmp) not in data["error"]


def test_cancel_then_ctrl_c_mid_job_stops_cleanly_and_a_public_bind_warns(photos):
    s = Server("--host", "0.0.0.0")
    assert any("warning:" in line and "no authentication" in line for line in s.log), s.log
    assert s.url.startswith("http://127.0.0.1:")
    body = (photos / "astronaut.png").read_bytes()
    # a running job can be cancelled; the next one runs
    _, job = s.api("/api/jobs", body, name="astronaut.png", session="t", steps=8)
    until(lambda: s.api(f"/api/jobs/{job['id']}")[1]["state"] != "queued")
    assert s.api(f"/api/jobs/{job['id']}/cancel", b"")[0] == 200
    j = until(lambda: (j := s.api(f"/api/jobs/{job['id']}")[1])["state"] != "running" and j)
    assert j["state"] == "cancelled" and j["tiles"] < j["tiles_total"]
    # Ctrl-C while a job runs: exit 0, temp folder gone, no traceback
    _, job = s.api("/api/jobs", body, name="astronaut.png", session="t", steps=8)
    assert (s.tmp / job["id"]).is_dir()
    until(lambda: s.api(f"/api/jobs/{job['id']}")[1]["state"] != "queued")
    assert s.stop() == 0 and s.log[-1] == "stopped; temp folder removed", s.log
    assert not s.tmp.exists() and not any("Traceback" in line for line in s.log)
    # a taken port: one line, non-zero
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = subprocess.run(
            [sys.executable, "-m", "teasr_cli", "serve", "--port", str(taken.getsockname()[1])],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=60,
        )
    assert r.returncode != 0 and r.stderr.startswith("error: cannot listen") and "--port" in r.stderr, r.stderr


# ------------------------------------------------------------------ in the browser


def test_upscale_compare_zoom_and_download_in_the_browser(server, browser, photos, downloads, tmp_path):
    d = browser
    open_page(d, server.url)
    submit(d, photos / "cat.png", steps=1)
    wait(d, lambda d: state(d, "cat.png") == "done", what="the job to finish")
    card = cards(d)["cat.png"]
    assert "64×64 → 256×256 · 1 step" in card.find_element(By.CSS_SELECTOR, ".meta").text
    info = d.find_element(By.ID, "result-info").text
    assert "cat_x4.png" in info and "256×256" in info and "1 step" in info and " s" in info
    wait(
        d,
        lambda d: d.execute_script("return after.complete && before.complete && after.naturalWidth > 0"),
        what="the images",
    )
    assert d.execute_script("return [after.naturalWidth, after.naturalHeight, before.naturalWidth]") == [256, 256, 64]

    # the download is the file `teasr upscale` writes for the same settings, byte for byte
    d.find_element(By.ID, "download").click()
    got = downloads / "cat_x4.png"
    wait(d, lambda d: got.exists() and got.stat().st_size > 0, what="the download")
    assert got.read_bytes() == cli_upscale(photos / "cat.png", tmp_path / "cli.png", steps=1)

    # drag the divider 150 px left: the after image is clipped at the divider's new place
    divider, after = d.find_element(By.ID, "divider"), d.find_element(By.ID, "after")
    x0, clip0 = px(divider.value_of_css_property("left")), after.get_attribute("style")
    ActionChains(d).drag_and_drop_by_offset(divider, -150, 0).perform()
    x1 = px(divider.value_of_css_property("left"))
    assert abs(x1 - (x0 - 150)) <= 2 and after.get_attribute("style") != clip0
    # 1:1 (full resolution), then pan by dragging the picture
    d.find_element(By.ID, "zoom-1").click()
    assert d.find_element(By.ID, "zoom-level").text == "100%"
    stage = d.find_element(By.ID, "stage")
    t0 = d.execute_script("return new DOMMatrix(getComputedStyle(arguments[0]).transform)", stage)
    ActionChains(d).move_to_element_with_offset(
        d.find_element(By.ID, "viewer"), 200, 100
    ).click_and_hold().move_by_offset(40, 30).release().perform()
    t1 = d.execute_script("return new DOMMatrix(getComputedStyle(arguments[0]).transform)", stage)
    assert (round(t1["e"] - t0["e"]), round(t1["f"] - t0["f"]), t1["a"]) == (40, 30, 1)
    shot = tmp_path / "teasr-serve.png"
    d.save_screenshot(str(shot))
    with Image.open(shot) as img:
        assert img.size[0] >= 1000


def test_corrupt_and_huge_uploads_say_why_and_the_next_job_runs(server, browser, photos):
    d = browser
    open_page(d, server.url)
    submit(d, photos / "corrupt.jpg", photos / "huge.png", photos / "coffee.jpg", steps=1)
    wait(d, lambda d: state(d, "coffee.jpg") == "done", what="the good upload's job")
    errors = [li.text for li in d.find_elements(By.CSS_SELECTOR, "#errors li")]
    assert len(errors) == 2 and "Traceback" not in "".join(errors), errors
    huge, corrupt = errors  # newest first
    assert corrupt.startswith("corrupt.jpg: ") and "corrupt or truncated" in corrupt
    assert huge.startswith("huge.png: ") and "20000x10000 = 200,000,000 pixels, more than the limit" in huge
    assert str(server.tmp) not in "".join(errors) and set(cards(d)) >= {"coffee.jpg"} and server.proc.poll() is None


def test_two_pages_queue_cancel_and_both_outputs_equal_the_cli(server, browser, photos, tmp_path):
    d = browser
    open_page(d, server.url)
    first = d.current_window_handle
    d.switch_to.new_window("window")
    open_page(d, server.url)
    second = d.current_window_handle
    assert not cards(d)  # a new tab is a new session: its own list
    submit(d, photos / "cat.png", photos / "rocket.png", steps=2, run=False)
    d.switch_to.window(first)
    submit(d, photos / "astronaut.png", steps=8)  # a few seconds: the other page's jobs, sent now, must wait
    wait(d, lambda d: state(d, "astronaut.png") == "running", what="the first job to start")
    d.switch_to.window(second)
    d.find_element(By.ID, "run").click()
    wait(d, lambda d: len(cards(d)) == 2, what="both jobs listed")
    status = {name: c.find_element(By.CSS_SELECTOR, ".status").text for name, c in cards(d).items()}
    assert status == {"cat.png": "queued: place 1 in line", "rocket.png": "queued: place 2 in line"}
    cards(d)["rocket.png"].find_element(By.CSS_SELECTOR, "button.cancel").click()
    wait(d, lambda d: state(d, "rocket.png") == "cancelled", what="the cancel")
    wait(d, lambda d: state(d, "cat.png") == "done", what="the second page's job")
    cat_id = cards(d)["cat.png"].get_attribute("data-id")
    d.switch_to.window(first)
    wait(d, lambda d: state(d, "astronaut.png") == "done", what="the first page's job")
    astro_id = cards(d)["astronaut.png"].get_attribute("data-id")

    def download(job_id):
        with urllib.request.urlopen(f"{server.url}api/jobs/{job_id}/download") as r:
            return r.read()

    assert download(astro_id) == cli_upscale(photos / "astronaut.png", tmp_path / "a.png", steps=8)
    assert download(cat_id) == cli_upscale(photos / "cat.png", tmp_path / "c.png", steps=2)

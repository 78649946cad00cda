"""teasr_cli.hub against a real (local, in-memory) Hub server: real downloads, real cache, real errors."""

import json
import time

import numpy as np
import pytest
from hubserver import point_hub_at, serve_hub
from huggingface_hub import constants, hf_hub_download, snapshot_download
from safetensors.numpy import load_file, save
from skimage import data as skdata

from teasr_cli import hub
from teasr_cli.errors import ModelError, TeasrError


def _model_files(seed: int) -> dict[str, bytes]:
    """A small but real model: a JSON config and a safetensors file (tensors cut from a real photo)."""
    img = skdata.chelsea()[seed * 8 : seed * 8 + 16, :16].astype(np.float32) / 255.0
    weights = {"x_embedder.weight": img.transpose(2, 0, 1).copy(), "step": np.array([seed], dtype=np.int64)}
    config = {"hidden_size": 32, "depth": 2, "patch_size": 2, "seed": seed}
    return {"config.json": json.dumps(config).encode(), "model.safetensors": save(weights)}


MAIN, V1 = _model_files(0), {**_model_files(1), "README.md": b"# teasr v1\n"}
REPOS = {
    "org/model": {"main": MAIN, "v1": V1},
    "org/not-a-model": {"main": {"config.json": b"{}", "README.md": b"# a text model\n"}},
    "datasets/org/images": {"main": {"pairs.zip": b"PK\x05\x06" + bytes(18), "info.txt": b"hello"}},
}


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    with serve_hub(REPOS) as (endpoint, server):
        point_hub_at(monkeypatch, endpoint, tmp_path / "hf-cache")
        yield server


def _read(folder):
    return {name: (folder / name).read_bytes() for name in hub.MODEL_FILES}


def _one_line_error(spec, *words, **kw):
    with pytest.raises(ModelError) as info:
        hub.resolve_model(spec, progress=False, **kw)
    msg = str(info.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    return msg


# --- Hub downloads ---------------------------------------------------------------------------


def test_download_fills_cache_then_works_offline_with_zero_requests(fake_hub, tmp_path, monkeypatch):
    folder = hub.resolve_model("org/model@v1", progress=False)
    commit = fake_hub.commit("org/model", "v1")
    cache = tmp_path / "hf-cache" / "models--org--model"
    assert folder == cache / "snapshots" / commit
    assert _read(folder) == {k: V1[k] for k in hub.MODEL_FILES}
    assert (folder / "README.md").read_bytes() == V1["README.md"]
    assert (cache / "refs" / "v1").read_text() == commit
    # model.safetensors took the LFS route: a 302 from the Hub, the bytes from the CDN server.
    assert fake_hub.count("/blobs/", "GET") == 1
    assert load_file(folder / "model.safetensors")["step"].tolist() == [1]

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = len(fake_hub.requests)
    assert hub.resolve_model("org/model@v1", progress=False) == folder
    assert len(fake_hub.requests) == before  # served from the cache alone


def test_pinned_revision_gets_its_own_bytes_not_mains(fake_hub):
    main = hub.resolve_model("org/model", progress=False)
    v1 = hub.resolve_model("org/model@v1", progress=False)
    assert main != v1
    assert _read(main) == {k: MAIN[k] for k in hub.MODEL_FILES}
    assert _read(v1) == {k: V1[k] for k in hub.MODEL_FILES}
    assert load_file(main / "model.safetensors")["step"].tolist() == [0]
    assert not (main / "README.md").exists()  # main has no card; that is fine


def test_commit_sha_revision_is_immutable_and_needs_no_request_once_cached(fake_hub):
    sha = fake_hub.commit("org/model", "v1")
    folder = hub.resolve_model(f"org/model@{sha}", progress=False)
    assert _read(folder) == {k: V1[k] for k in hub.MODEL_FILES}
    before = len(fake_hub.requests)
    assert hub.resolve_model(f"org/model@{sha}", progress=False) == folder
    assert len(fake_hub.requests) == before


def test_new_push_to_branch_is_picked_up_online(fake_hub):
    first = hub.resolve_model("org/model", progress=False)
    fake_hub.add("org/model", "main", V1)  # someone pushes a new commit to main
    second = hub.resolve_model("org/model", progress=False)
    assert second != first and _read(second) == {k: V1[k] for k in hub.MODEL_FILES}


def test_explicit_cache_dir(fake_hub, tmp_path):
    folder = hub.resolve_model("org/model", cache_dir=tmp_path / "elsewhere", progress=False)
    assert (tmp_path / "elsewhere") in folder.parents
    assert not (tmp_path / "hf-cache").exists()


def test_unknown_repo(fake_hub):
    _one_line_error("nobody/nothing", "nobody/nothing", "not found")


def test_unknown_revision(fake_hub):
    _one_line_error("org/model@v9", "org/model", "'v9'", "branch, tag or commit")


def test_repo_without_weights(fake_hub):
    _one_line_error("org/not-a-model", "org/not-a-model", "model.safetensors", "not a teasr model")


def test_offline_with_cold_cache(fake_hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _one_line_error("org/model@v1", "not in the local cache", "HF_HUB_OFFLINE", "pass a local folder")
    assert fake_hub.requests == []


def test_unreachable_hub_uses_warm_cache_and_explains_a_cold_one(monkeypatch, tmp_path):
    with serve_hub(REPOS) as (endpoint, _):
        point_hub_at(monkeypatch, endpoint, tmp_path / "hf-cache")
        warm = hub.resolve_model("org/model@v1", progress=False)
    # The server is gone now: connections are refused, as with no network.
    assert hub.resolve_model("org/model@v1", progress=False) == warm
    monkeypatch.setattr(time, "sleep", lambda s: None)  # huggingface_hub retries with back-off
    msg = _one_line_error("org/model", "not in the local cache", "cannot be reached")
    assert "HF_HUB_OFFLINE" not in msg


def test_unreachable_hub_fails_fast_without_retry_lines(monkeypatch, tmp_path, caplog):
    # A port nothing listens on: connection refused, as on a machine with no network. Real time, no patched sleep.
    with serve_hub(REPOS) as (endpoint, _):
        pass
    point_hub_at(monkeypatch, endpoint, tmp_path / "hf-cache")
    t0 = time.monotonic()
    msg = _one_line_error("org/name", "not in the local cache", "cannot be reached")
    assert time.monotonic() - t0 < 5, msg
    assert not [r for r in caplog.records if "Retrying" in r.getMessage()]
    assert not hub.hub_reachable()


def test_probe_sees_a_live_hub(fake_hub):
    assert hub.hub_reachable()


# --- local folders, names, the embedded model -----------------------------------------------


def _write_model(folder, files=MAIN):
    folder.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        (folder / name).write_bytes(blob)
    return folder


def test_local_folder(tmp_path):
    folder = _write_model(tmp_path / "my-model")
    assert hub.resolve_model(str(folder)) == folder.resolve()
    assert hub.resolve_model(folder) == folder.resolve()  # a Path works too


def test_local_folder_shadows_repo_id_of_same_spelling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_model(tmp_path / "org" / "model")
    assert hub.resolve_model("org/model") == (tmp_path / "org" / "model").resolve()  # no network touched


def test_local_folder_missing_weights(tmp_path):
    folder = _write_model(tmp_path / "half", {"config.json": b"{}"})
    _one_line_error(str(folder), "model.safetensors", str(folder))


def test_local_path_that_does_not_exist_or_is_a_file(tmp_path):
    _one_line_error(str(tmp_path / "nope"), "does not exist")
    _one_line_error("./no/such/folder", "does not exist")
    weights = _write_model(tmp_path / "m") / "model.safetensors"
    _one_line_error(str(weights), "is a file", "folder")


def test_unknown_name_lists_known_names():
    _one_line_error("teasr-huge", "unknown model 'teasr-huge'", hub.DEFAULT_MODEL)


@pytest.mark.parametrize("spec", [None, "", "default", hub.DEFAULT_MODEL])
def test_default_model_embedded(spec, tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "EMBEDDED_DIR", tmp_path / "weights")
    (tmp_path / "weights").mkdir()
    _one_line_error(spec, "embedded model", "not installed", "model.safetensors")
    assert hub.list_models()[0][:2] == (hub.DEFAULT_MODEL, "embedded (not installed)")
    _write_model(tmp_path / "weights")
    assert hub.resolve_model(spec) == tmp_path / "weights"
    assert hub.list_models()[0][:2] == (hub.DEFAULT_MODEL, "embedded")


def test_known_models_are_all_real():
    # No invented Hub repos: every known model is the embedded one until a release is published.
    assert hub.KNOWN_MODELS[hub.DEFAULT_MODEL].repo_id is None
    assert [row[0] for row in hub.list_models()] == list(hub.KNOWN_MODELS)


# --- repo specs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("org/name", ("org/name", None)),
        ("org/name@v1", ("org/name", "v1")),
        ("Org-1/na.me_2@refs/pr/3", ("Org-1/na.me_2", "refs/pr/3")),
        ("org/name@" + "a" * 40, ("org/name", "a" * 40)),
        ("  org/name@main ", ("org/name", "main")),
    ],
)
def test_parse_repo_spec(spec, expected):
    assert hub.parse_repo_spec(spec) == expected


@pytest.mark.parametrize("spec", ["name", "org/", "/name", "a/b/c", "org/name@", "org//name", "org/na me", "o--/x"])
def test_parse_repo_spec_rejects(spec):
    with pytest.raises(ModelError, match="malformed Hub repo id"):
        hub.parse_repo_spec(spec)


# --- the fake Hub itself, as other tests will rely on it ----------------------------------------


def test_fake_hub_serves_snapshot_download_and_datasets(fake_hub, tmp_path):
    snap = snapshot_download("org/model", revision="v1", allow_patterns=["*.json", "*.safetensors"])
    assert sorted(p.name for p in (tmp_path / "hf-cache").glob("models--org--model/snapshots/*/*")) == [
        "config.json",
        "model.safetensors",
    ]
    assert snap.endswith(fake_hub.commit("org/model", "v1"))
    zip_path = hf_hub_download("org/images", "pairs.zip", repo_type="dataset")
    assert open(zip_path, "rb").read() == REPOS["datasets/org/images"]["main"]["pairs.zip"]
    assert fake_hub.count("/datasets/org/images/resolve/main/pairs.zip", "HEAD") == 1


def test_upscaler_takes_the_revision_as_a_keyword_too(monkeypatch, tmp_path):
    """Upscaler.from_pretrained(repo, revision=...) as huggingface_hub users write it, on a real tiny model."""
    import torch
    from conftest import build_model

    from teasr_cli.codecs import PixelUnshuffleCodec
    from teasr_cli.folders import model_config, save_pretrained
    from teasr_cli.pipeline import Upscaler

    files = {}
    for rev, seed in (("main", 0), ("v1", 1)):
        model = build_model(seed=seed)
        folder = save_pretrained(model, model_config(model.config, PixelUnshuffleCodec(4).config()), tmp_path / rev)
        files[rev] = {name: (folder / name).read_bytes() for name in hub.MODEL_FILES}
    with serve_hub({"org/tiny": files}) as (endpoint, server):
        point_hub_at(monkeypatch, endpoint, tmp_path / "hf-cache")
        kw = Upscaler.from_pretrained("org/tiny", revision="v1", device="cpu", progress=False)
        at = Upscaler.from_pretrained("org/tiny@v1", device="cpu", progress=False)
        main = Upscaler.from_pretrained("org/tiny", device="cpu", progress=False)
        assert kw.folder == at.folder != main.folder and kw.folder.name == server.commit("org/tiny", "v1")
        lq = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        assert torch.equal(kw.upscale_tensor(lq), at.upscale_tensor(lq))
        with pytest.raises(TeasrError, match="revision="):
            Upscaler.from_pretrained("org/tiny@v1", revision="main", progress=False)

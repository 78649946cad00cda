"""Where a teasr model comes from: a known name, a local folder, or a Hugging Face Hub repo.

A teasr model is a folder holding MODEL_FILES (plus an optional README.md model card).
This module only finds or downloads that folder. Loading happens elsewhere and only through
safetensors, so resolving a model never unpickles anything.

Hub downloads go through `huggingface_hub.hf_hub_download` into the normal Hugging Face cache
(HF_HOME / HF_HUB_CACHE are honoured, files are shared with other HF tools), with its own
progress bars, and work offline (HF_HUB_OFFLINE=1 or no network) once the cache is warm.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session, silent_tqdm, validate_repo_id

from . import __version__
from .errors import ModelError

try:  # huggingface_hub 2.x speaks HTTP through httpx2; a connection dropped mid-download raises its errors
    from httpx2 import TransportError as _TransportError
except ImportError:  # pragma: no cover - other huggingface_hub generations raise OSError subclasses
    _TransportError = ConnectionError

EMBEDDED_DIR: Path = Path(__file__).parent / "weights"
DEFAULT_MODEL = "teasr-hybrid"
MODEL_FILES = ("config.json", "model.safetensors")
OPTIONAL_FILES = ("README.md",)
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_REPO_HINT = "a Hub repo id 'org/name' or 'org/name@revision'"
PROBE_TIMEOUT = 3.0  # seconds; a reachable Hub answers far sooner


@dataclass(frozen=True)
class ModelSource:
    """A named model: embedded in the package (repo_id None) or pinned to a Hub repo/revision."""

    name: str
    repo_id: str | None
    revision: str | None
    description: str


# Only models that really exist: the embedded one. Hub releases get an entry once they are published.
KNOWN_MODELS: dict[str, ModelSource] = {
    DEFAULT_MODEL: ModelSource(
        DEFAULT_MODEL, None, None, "default; hybrid dual-branch DiT with conv trunks, inside the package, runs on a CPU"
    ),
}


def parse_repo_spec(spec: str) -> tuple[str, str | None]:
    """Split "org/name@revision" into ("org/name", "revision"); the revision is optional."""
    repo_id, sep, revision = spec.strip().partition("@")
    # Hub repo ids cannot contain "@", so the first one separates the revision (which may hold "/").
    bad = repo_id.count("/") != 1 or (sep and not revision) or any(c.isspace() for c in revision)
    if not bad:
        try:
            validate_repo_id(repo_id)
        except HFValidationError:
            bad = True
    if bad:
        raise ModelError(f"malformed Hub repo id '{spec}': expected {_REPO_HINT} (branch, tag or commit sha)")
    return repo_id, revision or None


def resolve_model(
    spec: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> Path:
    """Return a local folder holding MODEL_FILES for `spec`, downloading from the Hub if needed.

    `spec` is None/"default" (the embedded model), a known name, a local folder, or "org/name[@revision]".
    An existing folder wins over a repo id of the same spelling, so a local copy is never shadowed.
    """
    if isinstance(spec, os.PathLike):
        return _check_folder(Path(spec))
    name = (spec or "").strip()
    name = DEFAULT_MODEL if name in ("", "default") else name
    if name in KNOWN_MODELS:
        src = KNOWN_MODELS[name]
        return _embedded(name) if src.repo_id is None else _download(src.repo_id, src.revision, cache_dir, progress)
    path = Path(name).expanduser()
    if path.is_dir():
        return _check_folder(path)
    if path.exists():
        raise ModelError(f"{name} is a file; pass the folder that holds {' and '.join(MODEL_FILES)}")
    if name.startswith((".", "/", "~", "\\")) or "\\" in name:
        raise ModelError(f"model folder {name} does not exist; pass an existing folder, a known name or {_REPO_HINT}")
    if "/" in name:
        try:
            repo_id, revision = parse_repo_spec(name)
        except ModelError:
            raise ModelError(f"'{name}' is neither an existing model folder nor {_REPO_HINT}") from None
        return _download(repo_id, revision, cache_dir, progress)
    known = ", ".join(KNOWN_MODELS)
    raise ModelError(f"unknown model '{name}': use a known name ({known}), a local folder, or {_REPO_HINT}")


def list_models() -> list[tuple[str, str, str]]:
    """(name, where, description) for every known model, for `teasr models`."""
    rows = []
    for src in KNOWN_MODELS.values():
        if src.repo_id is None:
            where = "embedded" if not _missing(EMBEDDED_DIR) else "embedded (not installed)"
        else:
            where = f"hub:{src.repo_id}" + (f"@{src.revision}" if src.revision else "")
        rows.append((src.name, where, src.description))
    return rows


def _missing(folder: Path) -> list[str]:
    return [f for f in MODEL_FILES if not (folder / f).is_file()]


def _check_folder(path: Path) -> Path:
    path = path.expanduser()
    if not path.is_dir():
        raise ModelError(f"model folder {path} does not exist; pass a folder holding {' and '.join(MODEL_FILES)}")
    if missing := _missing(path):
        needed = " and ".join(MODEL_FILES)
        raise ModelError(f"model folder {path} has no {' and '.join(missing)}; a teasr model folder holds {needed}")
    return path.resolve()


def _embedded(name: str) -> Path:
    # Read the module global at call time so an install (or a test) can point it elsewhere.
    if missing := _missing(EMBEDDED_DIR):
        raise ModelError(
            f"the embedded model '{name}' is not installed ({' and '.join(missing)} missing in {EMBEDDED_DIR}); "
            f"reinstall teasr or pass a local model folder or {_REPO_HINT}"
        )
    return EMBEDDED_DIR


def _download(repo_id: str, revision: str | None, cache_dir, progress: bool) -> Path:
    """Fetch MODEL_FILES (+ optional card) of one commit into the HF cache; return its snapshot folder."""
    where = f"{repo_id}@{revision}" if revision else repo_id
    kw = dict(
        repo_id=repo_id,
        cache_dir=cache_dir,
        library_name="teasr",
        library_version=__version__,
        tqdm_class=None if progress else silent_tqdm,
    )
    cached_commit = _COMMIT_RE.fullmatch(revision or "") and isinstance(
        try_to_load_from_cache(repo_id, MODEL_FILES[0], cache_dir=cache_dir, revision=revision), str
    )
    # Without a network huggingface_hub retries each request with back-off for ~30 s, logging every retry:
    # one bounded probe first, and the cache alone (or a fast, clear error) when the Hub is unreachable.
    kw["local_files_only"] = not constants.is_offline_mode() and not cached_commit and not hub_reachable()
    folder, rev = None, revision
    for filename in MODEL_FILES:
        try:
            folder = Path(hf_hub_download(filename=filename, revision=rev, **kw)).parent
        except (OSError, EntryNotFoundError, _TransportError) as err:
            raise _hub_error(err, repo_id, revision, filename) from err
        # Pin the remaining files to the commit the first one came from: a push to the branch between
        # two requests then cannot mix versions, and a cached commit needs no request at all.
        if _COMMIT_RE.fullmatch(folder.name):
            rev = folder.name
    for filename in OPTIONAL_FILES:
        cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=rev)
        if cached is not None and not isinstance(cached, str):
            continue  # neither a path nor "unknown": the Hub already told us this commit has no such file
        try:
            hf_hub_download(filename=filename, revision=rev, **kw)
        except (OSError, EntryNotFoundError, _TransportError):
            pass  # a model card is nice to have, never a reason to fail
    assert folder is not None
    if missing := _missing(folder):  # all files of one commit share a snapshot folder; guard the assumption
        raise ModelError(f"cached Hub model '{where}' at {folder} lacks {', '.join(missing)}; delete it and retry")
    return folder


def push_model(folder, repo_id: str, *, private: bool = False, message: str | None = None) -> str:
    """Upload a model folder (MODEL_FILES and its card) to the Hub repo `org/name`, creating the repo if needed;
    return the commit's URL. The token is huggingface_hub's (HF_TOKEN or `hf auth login`)."""
    folder = _check_folder(Path(folder))
    repo_id, revision = parse_repo_spec(repo_id)
    if not constants.is_offline_mode() and not hub_reachable():
        raise ModelError(f"the Hub ({constants.ENDPOINT}) cannot be reached; push again with a network")
    try:
        api = HfApi(endpoint=constants.ENDPOINT, library_name="teasr", library_version=__version__)
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=revision,
            allow_patterns=[*MODEL_FILES, *OPTIONAL_FILES],
            commit_message=message or f"Upload {folder.name} with teasr {__version__}",
        )
    except (OSError, HfHubHTTPError, ValueError, _TransportError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        auth = "401" in first_line or "token" in first_line.lower()
        hint = "; log in with `hf auth login` (a write token)" if auth else ""
        raise ModelError(f"could not push {folder} to '{repo_id}': {first_line}{hint}") from err
    return info.commit_url


def hub_reachable(timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether the Hub endpoint answers one HEAD request (any status) within `timeout` seconds.

    Run in a thread so that a slow name lookup, which no socket timeout covers, is bounded too.
    """
    answered = threading.Event()

    def probe():
        try:
            get_session().head(constants.ENDPOINT, timeout=timeout)
            answered.set()
        except Exception:  # refused, no route, no DNS, TLS failure: all mean unreachable here
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1)
    return answered.is_set()


def _hub_error(err: Exception, repo_id: str, revision: str | None, filename: str) -> ModelError:
    """Turn a huggingface_hub failure into one line that says what is wrong and what to do."""
    where = f"{repo_id}@{revision}" if revision else repo_id
    if isinstance(err, RepositoryNotFoundError):  # also GatedRepoError; the Hub answers 401 for private repos
        return ModelError(
            f"Hub repo '{repo_id}' not found or not accessible; check the name, "
            "or log in with `hf auth login` if it is private or gated"
        )
    if isinstance(err, RevisionNotFoundError):
        return ModelError(
            f"Hub repo '{repo_id}' has no revision '{revision}'; pass an existing branch, tag or commit sha"
        )
    if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled, _TransportError)):
        why = " (HF_HUB_OFFLINE is set)" if constants.is_offline_mode() else ""
        return ModelError(
            f"model '{where}' is not in the local cache and the Hub cannot be reached{why}; "
            "run once with a network or pass a local folder"
        )
    if isinstance(err, EntryNotFoundError):
        return ModelError(
            f"Hub repo '{where}' has no {filename}, so it is not a teasr model; "
            f"a teasr model repo holds {' and '.join(MODEL_FILES)}"
        )
    if isinstance(err, HfHubHTTPError):
        status = getattr(err.response, "status_code", "?")
        return ModelError(f"the Hub answered HTTP {status} for {filename} of '{where}'; try again later")
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return ModelError(f"could not fetch {filename} of '{where}': {first_line}")

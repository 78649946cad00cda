"""A tiny in-memory Hugging Face Hub on 127.0.0.1, so Hub code is tested for real without a network.

It serves the routes huggingface_hub 2.x calls:

- HEAD/GET `/{repo}/resolve/{revision}/{path}` (`/datasets/{repo}/...` for dataset repos) with the
  `X-Repo-Commit` and `ETag` headers `hf_hub_download` needs. Large files (LFS on the real Hub)
  answer 302 with `X-Linked-Etag`/`X-Linked-Size` to a second "CDN" server on another port, which
  is what the Hub does, so the client's redirect handling runs too.
- 404 with `X-Error-Code` RepoNotFound / RevisionNotFound / EntryNotFound, which
  `hf_raise_for_status` turns into the matching exceptions.
- GET `/api/{models,datasets}/{repo}/revision/{revision}` and `/api/.../tree/{revision}` for
  `snapshot_download`.
- POST `/api/repos/create`, `/api/validate-yaml`, `/api/.../preupload/{revision}` and
  `/api/.../commit/{revision}` for `create_repo` and `upload_folder` (every file "regular", sent inline
  in the commit's NDJSON, so no LFS transfer is needed).

Usage::

    with serve_hub({"org/model": {"main": {"config.json": b"{}"}}}) as (endpoint, hub):
        point_hub_at(monkeypatch, endpoint, tmp_path / "hf-cache")
        ...
        assert hub.count("resolve") == 2

Repos map a repo id (prefix "datasets/" for a dataset repo) to {revision: {filename: bytes}}.
A revision key is a branch/tag name or a 40-hex commit sha; each one becomes its own commit,
whose sha `hub.commit(repo, revision)` returns and which can be resolved by that sha too.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".zip", ".tar", ".gz", ".npz")
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_API_RE = re.compile(r"^/api/(models|datasets)/(.+?)/(revision|tree)/([^/]+)(/.*)?$")
_POST_RE = re.compile(r"^/api/(models|datasets)/(.+?)/(preupload|commit)/([^/]+)$")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file, which the Hub sends as ETag of non-LFS files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """Repos, commits and a request log shared by the Hub and CDN servers."""

    def __init__(self, repos: dict[str, dict[str, dict[str, bytes]]]):
        self.refs: dict[str, dict[str, str]] = {}  # repo key -> revision name -> commit sha
        self.commits: dict[str, dict[str, dict[str, bytes]]] = {}  # repo key -> sha -> files
        self.blobs: dict[str, bytes] = {}  # sha256 -> bytes, what the CDN serves
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, both servers
        self.endpoint = self.cdn = ""
        self._lock = threading.Lock()
        for repo, revisions in repos.items():
            for revision, files in revisions.items():
                self.add(repo, revision, files)

    def add(self, repo: str, revision: str, files: dict[str, bytes]) -> str:
        """Add (or move `revision` to) a new commit holding `files`; return its sha."""
        if _COMMIT_RE.fullmatch(revision):
            sha = revision
        else:
            digest = hashlib.sha1(f"{repo}\0{revision}".encode())
            for name in sorted(files):
                digest.update(name.encode() + hashlib.sha256(files[name]).digest())
            sha = digest.hexdigest()
        self.commits.setdefault(repo, {})[sha] = dict(files)
        self.refs.setdefault(repo, {})[revision] = sha
        for data in files.values():
            self.blobs[hashlib.sha256(data).hexdigest()] = data
        return sha

    def commit(self, repo: str, revision: str = "main") -> str:
        return self.refs[repo][revision]

    def count(self, contains: str = "", method: str | None = None) -> int:
        """Number of requests whose path contains `contains` (and with `method`, if given)."""
        with self._lock:
            return sum(contains in p and method in (None, m) for m, p in self.requests)

    def log(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def files(self, repo: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
        """(sha, files) for a branch/tag name or a commit sha, None if unknown."""
        sha = self.refs[repo].get(revision, revision)
        return (sha, self.commits[repo][sha]) if sha in self.commits[repo] else None


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub  # set on a per-server subclass
    is_cdn = False

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_HEAD(self) -> None:
        self._route(body=False)

    def do_GET(self) -> None:
        self._route(body=True)

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        self.hub.log("POST", path)
        req = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if path == "/api/repos/create":
            info = json.loads(req)
            repo = ("datasets/" if info.get("type") == "dataset" else "") + "/".join(
                p for p in (info.get("organization"), info["name"]) if p
            )
            if repo in self.hub.commits:
                return self._json(409, {"error": "You already created this repo", "url": f"{self.hub.endpoint}/{repo}"})
            self.hub.add(repo, "main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
            return self._json(200, {"url": f"{self.hub.endpoint}/{repo}", "name": repo})
        if path == "/api/validate-yaml":
            return self._json(200, {"errors": [], "warnings": []})
        if not (m := _POST_RE.match(path)):
            return self._error(404, None)
        kind, repo, what, revision = m.groups()
        repo, revision = ("datasets/" if kind == "datasets" else "") + unquote(repo), unquote(revision)
        if not self._repo(repo):
            return
        if (found := self.hub.files(repo, revision)) is None:
            return self._error(404, "RevisionNotFound")
        if what == "preupload":
            files = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in json.loads(req)["files"]
            ]
            return self._json(200, {"files": files})
        files = dict(found[1])
        for line in req.splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                files.pop(item["value"]["path"], None)
            elif item["key"] != "header":
                return self._json(400, {"error": f"this test Hub takes inline files only, not {item['key']}"})
        sha = self.hub.add(repo, revision, files)
        self._json(
            200, {"commitUrl": f"{self.hub.endpoint}/{repo}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None}
        )

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json"}, True)

    def _route(self, body: bool) -> None:
        path = urlsplit(self.path).path
        self.hub.log(self.command, path)
        if self.is_cdn:
            data = self.hub.blobs.get(path.rpartition("/")[2])
            return self._send(200, data, {}, body) if data is not None else self._error(404, None)
        if m := _API_RE.match(path):
            return self._api(m)
        if "/resolve/" in path:
            return self._resolve(path, body)
        self._error(404, None)

    def _repo(self, repo: str) -> bool:
        return repo in self.hub.commits or self._error(404, "RepoNotFound")

    def _resolve(self, path: str, body: bool) -> None:
        repo, _, rest = path.lstrip("/").partition("/resolve/")
        revision, _, filename = rest.partition("/")
        repo, revision, filename = unquote(repo), unquote(revision), unquote(filename)
        if not self._repo(repo):
            return
        if (found := self.hub.files(repo, revision)) is None:
            return self._error(404, "RevisionNotFound")
        sha, files = found
        if filename not in files:
            return self._error(404, "EntryNotFound", {"X-Repo-Commit": sha})
        data = files[filename]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha1(data)}"'}
        if filename.endswith(LFS_SUFFIXES):  # LFS: the Hub redirects to a CDN and names the blob by sha256
            oid = hashlib.sha256(data).hexdigest()
            headers |= {"X-Linked-Etag": f'"{oid}"', "X-Linked-Size": str(len(data))}
            headers["Location"] = f"{self.hub.cdn}/{oid}"
            return self._send(302, b"", headers, body)
        self._send(200, data, headers, body)

    def _api(self, m: re.Match) -> None:
        kind, repo, what, revision, _sub = m.groups()
        repo = ("datasets/" if kind == "datasets" else "") + unquote(repo)
        if not self._repo(repo):
            return
        if (found := self.hub.files(repo, unquote(revision))) is None:
            return self._error(404, "RevisionNotFound")
        sha, files = found
        if what == "revision":
            info = {"id": repo.removeprefix("datasets/"), "sha": sha, "siblings": [{"rfilename": f} for f in files]}
        else:  # the tree listing (files only, one page), as snapshot_download reads it
            info = [_tree_entry(name, data) for name, data in sorted(files.items())]
        self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, True)

    def _error(self, status: int, code: str | None, headers: dict | None = None) -> bool:
        self._send(status, b"not found", {**({"X-Error-Code": code} if code else {}), **(headers or {})}, True)
        return False

    def _send(self, status: int, data: bytes, headers: dict, body: bool) -> None:
        self.send_response(status)
        for key, value in {"Content-Length": str(len(data)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(data)


def _tree_entry(name: str, data: bytes) -> dict:
    entry = {"type": "file", "path": name, "size": len(data), "oid": git_blob_sha1(data)}
    if name.endswith(LFS_SUFFIXES):
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry


def _start(hub: FakeHub, is_cdn: bool) -> tuple[ThreadingHTTPServer, str]:
    handler = type("Handler", (_Handler,), {"hub": hub, "is_cdn": is_cdn})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)  # port 0: the OS picks a free one
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@contextlib.contextmanager
def serve_hub(repos: dict[str, dict[str, dict[str, bytes]]]) -> Iterator[tuple[str, FakeHub]]:
    """Run a fake Hub (and its CDN) for the duration of the block; yield (endpoint_url, hub)."""
    hub = FakeHub(repos)
    cdn, cdn_url = _start(hub, is_cdn=True)
    server, hub.endpoint = _start(hub, is_cdn=False)
    hub.cdn = cdn_url + "/blobs"
    try:
        yield hub.endpoint, hub
    finally:
        for s in (server, cdn):
            s.shutdown()
            s.server_close()


def point_hub_at(monkeypatch, endpoint: str, cache_dir) -> None:
    """Make huggingface_hub (already imported) talk to `endpoint` and cache into `cache_dir`.

    huggingface_hub reads HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE once at import, into
    `constants`; the URL template is derived from the endpoint then too, so both are patched.
    The environment is set as well, for subprocesses.
    """
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # huggingface_hub fetches an agent registry once per process and caches it under HF_HOME: keep it local.
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(Path(cache_dir) / ".agent_harnesses.json"))
    for key, value in {"HF_ENDPOINT": endpoint, "HF_HUB_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "0"}.items():
        monkeypatch.setenv(key, value)

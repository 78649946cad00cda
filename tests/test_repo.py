"""The repository itself: what git tracks stays small enough to clone, and to carry to a device machine."""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_TRACKED_BYTES = 64 * 2**20  # a device call refuses a bigger tree; a clone should not fetch checkpoints


def tracked_files() -> list[Path]:
    git = lambda *args: subprocess.run(["git", *args], cwd=ROOT, capture_output=True, check=True).stdout  # noqa: E731
    try:
        top = Path(git("rev-parse", "--show-toplevel").decode().strip()).resolve()
    except (OSError, subprocess.CalledProcessError):
        top = None
    if top != ROOT:  # an unpacked sdist, or a copy inside some other repository
        pytest.skip("not a git checkout of this project")
    out = git("ls-files", "-z")
    return [ROOT / p for p in out.decode().split("\0") if p]


def test_tracked_tree_is_under_64_mib():
    # files deleted in the working tree but not yet committed do not count: they are on their way out
    sizes = {p.relative_to(ROOT).as_posix(): p.stat().st_size for p in tracked_files() if p.is_file()}
    total = sum(sizes.values())
    biggest = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])[:3])
    assert total <= MAX_TRACKED_BYTES, f"tracked files are {total / 2**20:.1f} MiB (limit 64); largest: {biggest}"


def test_train_checkpoints_holds_at_most_one_folder():
    # one resumable folder for the running campaign, replaced in place; finished models go to a model folder
    ckpts = ROOT / "train" / "checkpoints"
    folders = sorted(p.name for p in ckpts.iterdir() if p.is_dir()) if ckpts.is_dir() else []
    assert len(folders) <= 1, f"train/checkpoints/ holds {len(folders)} folders: {', '.join(folders)}"

"""What a device call would send: the working tree (tracked and untracked-but-not-ignored files, and shared/ where
the checkout has one) plus the ignored paths named in `carry`; the device refuses more than 64 MiB.

    python train/payload.py --carry packs/gpu          # prints the sizes; exit 1 if over the limit
    python train/payload.py --carry packs/gpu --json   # the same as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

LIMIT = 64 * 2**20
ROOT = Path(__file__).resolve().parents[1]


def _walk(path: Path):
    if path.is_symlink() or path.is_file():
        yield path
    elif path.is_dir():
        for dirpath, _, names in os.walk(path):
            for n in names:
                yield Path(dirpath) / n


def tree_files(root: Path = ROOT) -> list[Path]:
    """Relative paths of the files the tree sends without `carry` (deleted tracked files do not travel)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            check=True,
            capture_output=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"payload: cannot list the files of {root} with git: {e}") from None
    files = {Path(p) for p in out.decode().split("\0") if p}
    files |= {f.relative_to(root) for f in _walk(root / "shared")}
    return sorted(f for f in files if (root / f).is_symlink() or (root / f).is_file())


def measure(carry: list[str] = (), root: Path = ROOT) -> dict:
    """Bytes per part and in all; a carried path inside the tree's files is counted once."""
    tree = tree_files(root)
    seen = set(tree)
    carried, missing = {}, []
    for c in carry:
        if not (root / c).exists():
            missing.append(c)
            continue
        new = [f.relative_to(root) for f in _walk(root / c) if f.relative_to(root) not in seen]
        seen.update(new)
        carried[c] = sum((root / f).lstat().st_size for f in new)
    sizes = {f: (root / f).lstat().st_size for f in tree}
    total = sum(sizes.values()) + sum(carried.values())
    return {
        "tree_bytes": sum(sizes.values()),
        "tree_files": len(tree),
        "carried_bytes": carried,
        "missing_carry": missing,
        "total_bytes": total,
        "limit_bytes": LIMIT,
        "fits": total <= LIMIT,
        "largest": [[str(f), s] for f, s in sorted(sizes.items(), key=lambda kv: -kv[1])[:8]],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--carry", nargs="*", default=[], help="ignored paths that travel too (relative to the repo)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    r = measure(args.carry)
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
        print(f"tree: {r['tree_files']} files, {mib(r['tree_bytes'])}")
        for c, b in r["carried_bytes"].items():
            print(f"carry {c}: {mib(b)}")
        for c in r["missing_carry"]:
            print(f"carry {c}: missing here (the device would remove it there)")
        print(f"payload: {mib(r['total_bytes'])} of {mib(LIMIT)} -> {'fits' if r['fits'] else 'TOO BIG'}")
        if not r["fits"]:
            print("largest: " + ", ".join(f"{f} {mib(s)}" for f, s in r["largest"]))
    return 0 if r["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())

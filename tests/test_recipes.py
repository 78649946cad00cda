"""A recipe in train/recipes/ that names a run on a `# run: NAME` line is the configuration that run logged: the
commands of train/README.md rebuild the shipped weights from files, not from memory. Recipes for runs still to
come (no such line) must at least load."""

import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest

from teasr_cli.sad import SADConfig
from teasr_cli.trainer import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "train" / "recipes").glob("*.toml"))
RUN_RE = re.compile(r"^# run: (\S+)", re.M)
LOGGED = [r for r in RECIPES if RUN_RE.search(r.read_text())]
LOGS = ROOT / "train" / "logs"
CAMPAIGN = ROOT / "train" / "checkpoints" / "campaign" / "metrics.jsonl"  # every campaign run's log, in order
# the embedded default's run
SHIPPED_RUN, SHIPPED_RECIPE = "runs/campaign-sad28", "campaign-cpu-sad-last-lpips25.toml"
# Paths are the command line's (they differ between machines); `steps` and the time budgets are where the run was
# stopped, checked below.
NOT_COMPARED = {"data", "out", "init", "steps", "max_minutes", "max_cpu_minutes"}


def run_of(recipe: Path) -> str:
    return RUN_RE.search(recipe.read_text()).group(1)


def logged_config(run: str) -> dict:
    """The start record of the run's metrics.jsonl; a run that continued another run's folder under a new recipe
    (tiny-sad5 resumed tiny-sad3's) logs its own config only in train_config.json, which each session rewrites."""
    start = json.loads((LOGS / run / "metrics.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start"
    if Path(start["config"]["out"]).name == run:
        return start["config"]
    return json.loads((LOGS / run / "train_config.json").read_text())


def logged_steps(run: str) -> list[int]:
    return [r["step"] for r in map(json.loads, (LOGS / run / "metrics.jsonl").read_text().splitlines()) if "step" in r]


def differences(loaded: dict, logged: dict, defaults: dict, prefix: str = "") -> list[str]:
    """Keys that differ; a key the log lacks (added to the code since) must hold its default, the old behaviour."""
    out = []
    for k in sorted(set(loaded) | set(logged)):
        if prefix == "" and k in NOT_COMPARED:
            continue
        if k not in loaded:
            out.append(f"{prefix}{k}: logged {logged[k]!r}, unknown to the code")
        elif k not in logged:
            if loaded[k] != defaults[k]:
                out.append(f"{prefix}{k}: {loaded[k]!r} in the recipe, absent from the log (default {defaults[k]!r})")
        else:
            a, b = loaded[k], logged[k]
            a, b = (list(a), list(b)) if isinstance(a, tuple) else (a, b)
            if a != b:
                out.append(f"{prefix}{k}: recipe {a!r}, logged {b!r}")
    return out


def test_there_is_a_recipe_for_every_run_of_the_teasr_tiny_chain():
    runs = {run_of(r) for r in LOGGED}
    assert {"tiny-prior", "tiny-prior2", "tiny-sad3", "tiny-sad5", "tiny-sad8", "tiny-sad9", "tiny-sad10"} <= runs
    assert len(runs) == len(LOGGED), "two recipes name the same run"


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_loads(recipe):
    cfg = TrainConfig.load(str(recipe), data="d", init="m")
    assert cfg.steps > 0 and cfg.stage in ("prior", "sad", "regress")


def recipe_differences(recipe: Path, logged: dict) -> list[str]:
    loaded = TrainConfig.load(str(recipe), data="d", init="m").to_dict()
    train_defaults, sad_defaults = asdict(TrainConfig()), asdict(SADConfig())
    diff = differences(
        {k: v for k, v in loaded.items() if k != "sad"}, {k: v for k, v in logged.items() if k != "sad"}, train_defaults
    )
    return diff + differences(loaded["sad"], logged["sad"], sad_defaults, prefix="sad.")


@pytest.mark.parametrize("recipe", LOGGED, ids=[r.stem for r in LOGGED])
def test_recipe_is_the_logged_config_of_its_run(recipe):
    run = run_of(recipe)
    cfg = TrainConfig.load(str(recipe), data="d", init="m")
    logged = logged_config(run)
    diff = recipe_differences(recipe, logged)
    assert not diff, f"{recipe.name} vs {run}'s log: " + "; ".join(diff)
    # the run got to the step the recipe stops at (logs come every log_every steps, a stop can fall between)
    steps = logged_steps(run)
    assert cfg.steps <= logged["steps"] and cfg.steps < max(steps) + cfg.log_every, (cfg.steps, max(steps))


def test_shipped_weights_are_the_end_of_their_recipes_run():
    """The embedded default is the fp16 export of one campaign run (issue 18, stopped by its CPU budget): its recipe
    is that run's logged config, the run ended at the shipped step, and the network is the campaign's."""
    records = [json.loads(line) for line in CAMPAIGN.read_text().splitlines()]
    starts = [i for i, r in enumerate(records) if r.get("config", {}).get("out") == SHIPPED_RUN]
    assert len(starts) == 1
    run = records[starts[0] :]
    run = run[: next((i for i, r in enumerate(run[1:], 1) if "config" in r), len(run))]
    diff = recipe_differences(ROOT / "train" / "recipes" / SHIPPED_RECIPE, run[0]["config"])
    assert not diff, f"{SHIPPED_RECIPE} vs {SHIPPED_RUN}'s log: " + "; ".join(diff)
    shipped = json.loads((ROOT / "teasr_cli" / "weights" / "config.json").read_text())
    assert shipped["trained"] == {
        "stage": run[0]["config"]["stage"],
        "steps": run[-1]["step"],
        "data": "data/photos/train",
    }
    assert shipped["model"] == json.loads((CAMPAIGN.parent / "config.json").read_text())["model"]

"""The package's import graph: no cycles, counting imports inside functions too (a lazy import hides a cycle from
the interpreter, not from a reader), and the model-folder format reachable without any backbone's extras."""

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "teasr_cli"


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the teasr_cli modules it imports anywhere in its source (a package's own submodules included)."""
    modules = {module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import mod` imports the module pkg.mod; `from mod import name` the module mod
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert {"teasr_cli.folders", "teasr_cli.model", "teasr_cli.backbones.qwen_image"} <= set(graph)
    assert "teasr_cli.folders" in graph["teasr_cli.backbones.qwen_image"]  # a top-level import
    assert "teasr_cli.metrics.frechet" in graph["teasr_cli.metrics"]  # a relative one
    # the detector itself finds a cycle of lazy imports like the one the folder module removed
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_a_native_model_loads_without_the_big_backbone_extras(tiny_model_dir):
    """folders finds a backbone by name on first use: a native folder never pulls in diffusers, peft or transformers."""
    code = (
        "import sys; from teasr_cli.folders import load_pretrained; load_pretrained(sys.argv[1]); "
        "print(sorted(m for m in ('diffusers', 'peft', 'transformers', 'teasr_cli.backbones.qwen_image') "
        "if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tiny_model_dir)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr[-500:]

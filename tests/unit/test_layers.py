"""The import graph points down only.

Every import statement of the project's packages (top level and inside functions, ``import x`` and
``from x import y``, relative ones resolved) is read with ``ast``; each module maps to its top-level
package, and

(a) a package imports only packages of a lower rank in :data:`LAYERS` (packages of one rank are
    siblings and never import each other: models and memory meet in ``assembly``, above both;
    train and sweeps are siblings, the sweep launches ``train/main.py`` as a process);
(b) no two modules import each other, directly or around a longer loop.

A failure names each offending import as ``file:line``. ARCHITECTURE.md draws the same picture.
"""
from __future__ import annotations

import ast
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

REPO = Path(__file__).resolve().parents[2]

# package -> rank: imports go to a strictly lower rank only.
LAYERS = {
    "core": 0,  # accounting, parameter-group tags, config helpers, collectives
    "rundir": 2,  # the run-directory contract: file names, writers, locks, run ids, outcomes, the config schema
    "data_prep": 1,  # corpus -> token shards, tokenizers
    "memory": 1,  # Engram: compression, hashing, tables
    "models": 1,  # backbone: attention, dense FFN, MoE, residual streams (memory handed in)
    "assembly": 2,  # the full model: models + memory + tokenizer names
    "train": 3,  # the trainer (DeepSpeed engine, checkpoints, tracking)
    "sweeps": 3,  # planning, launching, fitting: starts train/main.py as a process
    "benchmarks": 4,  # scripts over everything
}

# Known edges allowed for a while (none today): an entry must name an import that exists
# (test_allow_list_names_only_imports_that_exist fails on a stale one). Any other such import fails.
ALLOWED: frozenset = frozenset()


@dataclass(frozen=True)
class Import:
    """One project-internal import: module ``src`` (file:line) imports module ``dst``."""

    src: str
    dst: str
    file: str
    line: int
    text: str

    def where(self) -> str:
        return f"{self.file}:{self.line}: {self.src} imports {self.dst} ({self.text})"


def module_name(path: Path, root: Path) -> str:
    """``models/moe/layer.py`` -> ``models.moe.layer``; a package's ``__init__.py`` -> the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(name: str, modules: set[str]) -> Optional[str]:
    """The longest known module that ``name`` names or lies in (``models.Transformer`` -> ``models``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _targets(node: ast.AST, src: str, is_package: bool) -> Iterator[tuple[str, str]]:
    """(dotted name, source text) of everything an import node may load; ``from p import m`` also
    yields ``p.m`` (a submodule when one exists)."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name, f"import {alias.name}"
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            anchor = src.split(".") if is_package else src.split(".")[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        names = ", ".join(a.name for a in node.names)
        for alias in node.names:
            yield f"{base}.{alias.name}", f"from {'.' * node.level}{node.module or ''} import {names}"


def project_imports(root: Path = REPO, packages=tuple(LAYERS)) -> list[Import]:
    """Every import between modules of ``packages`` under ``root``, at any depth of the file."""
    files = {module_name(f, root): f for pkg in packages if (root / pkg).is_dir()
             for f in sorted((root / pkg).rglob("*.py"))}
    modules = set(files)
    out: dict[tuple[str, str, int], Import] = {}  # one entry per (src, dst, line)
    for src, path in files.items():
        rel = str(path.relative_to(root))
        for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
            for name, text in _targets(node, src, path.name == "__init__.py"):
                dst = _resolve(name, modules)
                if dst is not None and dst != src:
                    out.setdefault((src, dst, node.lineno), Import(src, dst, rel, node.lineno, text))
    return list(out.values())


def package(module: str) -> str:
    return module.split(".")[0]


def upward_imports(imports: list[Import], layers=LAYERS, allowed=frozenset()) -> list[str]:
    """Imports into a package of the same or a higher rank (other than the allowed pairs)."""
    bad = []
    for imp in imports:
        a, b = package(imp.src), package(imp.dst)
        if a != b and layers[b] >= layers[a] and (imp.src, imp.dst) not in allowed:
            why = "a sibling" if layers[b] == layers[a] else "above it"
            bad.append(f"{imp.where()}: {b} is {why} ({a} rank {layers[a]}, {b} rank {layers[b]})")
    return bad


def import_cycles(imports: list[Import], allowed=frozenset()) -> list[str]:
    """One line per cycle of modules (strongly connected component), listing its imports; the
    ``allowed`` (src, dst) edges are left out of the graph."""
    imports = [i for i in imports if (i.src, i.dst) not in allowed]
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.src, set()).add(imp.dst)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return ["import cycle between " + ", ".join(sorted(c)) + ": "
            + "; ".join(i.where() for i in imports if i.src in c and i.dst in c) for c in components]


# ---- the project ----------------------------------------------------------------------------------
def test_every_package_has_a_layer_and_is_installed():
    found = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()} - {"tests"}
    assert found <= set(LAYERS), f"packages without a layer in LAYERS: {sorted(found - set(LAYERS))}"
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    missing = sorted(p for p in found if f"{p}*" not in include)
    assert not missing, f"packages missing from pyproject.toml [tool.setuptools.packages.find] include: {missing}"


def test_imports_point_down_only():
    bad = upward_imports(project_imports(), allowed=ALLOWED)
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycle_between_modules():
    cycles = import_cycles(project_imports(), allowed=ALLOWED)
    assert not cycles, "\n".join(cycles)


def test_allow_list_names_only_imports_that_exist():
    """A stale entry would let the edge come back unnoticed: drop it once the import is gone."""
    edges = {(i.src, i.dst) for i in project_imports()}
    assert ALLOWED <= edges, f"allow-list entries with no import left: {sorted(ALLOWED - edges)}"


# ---- inside sweeps/: planning, then execution, then analysis, then the commands ---------------------------
SWEEPS_GROUPS = ("planning", "execution", "analysis")  # subpackages, in order; the commands live in sweeps/ itself


def _sweeps_rank(module: str) -> int:
    parts = module.split(".")
    if parts[0] != "sweeps":
        return -1
    return SWEEPS_GROUPS.index(parts[1]) if len(parts) > 2 and parts[1] in SWEEPS_GROUPS else len(SWEEPS_GROUPS)


def test_sweeps_subpackages_point_down_only():
    """planning -> execution -> analysis -> commands (sweeps/*.py): a module imports its own group and the
    ones before it, never one after."""
    edges = [i for i in project_imports() if _sweeps_rank(i.src) >= 0 and _sweeps_rank(i.dst) >= 0]
    bad = [i.where() for i in edges if _sweeps_rank(i.dst) > _sweeps_rank(i.src)]
    assert len(edges) > 80 and not bad, "sweeps/ imports against planning -> execution -> analysis -> commands:\n" + \
        "\n".join(bad)
    loose = sorted(p.name for p in (REPO / "sweeps").glob("*.py"))
    assert loose == ["__init__.py", "demo.py", "plan.py", "run.py", "study.py", "study_config.py", "study_report.py"], (
        f"sweeps/ itself holds the commands only; put a new module in {', '.join(SWEEPS_GROUPS)}: {loose}")


# ---- the checker itself, on a small tree ------------------------------------------------------------
def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_checker_finds_function_level_and_relative_imports_with_file_and_line(tmp_path):
    root = _tree(tmp_path, {
        "low/__init__.py": "",
        "low/a.py": "import os\n\n\ndef f():\n    from high import b  # hidden upward arrow\n",
        "low/c.py": "from . import a\nfrom .a import f\n",
        "high/__init__.py": "",
        "high/b.py": "import low.c\n",
    })
    imports = project_imports(root, ("low", "high"))
    assert {(i.src, i.dst, i.line) for i in imports} == {
        ("low.a", "high.b", 5), ("low.c", "low.a", 1), ("low.c", "low.a", 2), ("high.b", "low.c", 1)}
    bad = upward_imports(imports, {"low": 0, "high": 1})
    assert len(bad) == 1 and bad[0].startswith("low/a.py:5: low.a imports high.b (from high import b)")
    assert upward_imports(imports, {"low": 0, "high": 1}, allowed={("low.a", "high.b")}) == []
    assert "sibling" in upward_imports(imports, {"low": 1, "high": 1})[0]


def test_checker_reports_a_cycle_through_three_modules(tmp_path):
    root = _tree(tmp_path, {
        "p/__init__.py": "",
        "p/a.py": "from p import b\n",
        "p/b.py": "import p.c\n",
        "p/c.py": "def g():\n    from p.a import thing\n",
        "p/d.py": "from p import a\n",  # into the cycle, not part of it
    })
    cycles = import_cycles(project_imports(root, ("p",)))
    assert len(cycles) == 1 and cycles[0].startswith("import cycle between p.a, p.b, p.c:")
    assert "p/c.py:2: p.c imports p.a" in cycles[0] and "p/d.py" not in cycles[0]
    assert import_cycles(project_imports(root, ("p",)), allowed={("p.c", "p.a")}) == []

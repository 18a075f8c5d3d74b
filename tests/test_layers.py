"""The folders are the layers: a module imports only from its own folder or from folders below it, without
circles (README, "Code layout"); no folder grows past a screenful of modules; and the work directory's file
names are spelled only in utils/workdir/artifacts.py."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helpers import ROOT

# Bottom to top: a module may import its own package (without circles) and the packages listed before it.
LAYERS: list[tuple[str, str]] = [
    ("config", "defaults, overrides, validation"),
    ("backbones", "the networks and adaptors by name"),
    ("utils.core", "errors, atomic io, numerics, locks, logs, signals, distributed, weight loading"),
    ("utils.data", "images, alignment, .bin and RecordIO, splits, synthetic data, the index, datasets"),
    ("utils.workdir", "every name of work_dirs/, provenance, the store format, the run's inputs, finished runs"),
    ("utils.train", "the task contract, the loop, checkpoints, margin heads, the monitor"),
    ("utils.stages", "one module per stage and their common parts"),
    ("eval.metrics", "the 10-fold protocol, fairness, bootstrap, operating points"),
    ("eval.rfw", "RFW pairs and landmarks, flip-TTA embeddings, the per-epoch evaluator"),
    ("eval.report", "tables, statistics, figures, seeds, sweep"),
    ("eval", "the command-line tools: evaluate, embed, export, kd_targets"),
    ("utils.pipeline", "plan and launch"),
    ("scripts", "the stage scripts and run_pipeline.py"),
    ("benchmarks", "one script per figure"),
]
RANK = {package: number for number, (package, _) in enumerate(LAYERS)}
SOURCE_FOLDERS = ("config", "backbones", "utils", "eval", "benchmarks")
MAX_MODULES_PER_FOLDER = 12


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _our_modules() -> dict[str, Path]:
    files = [p for folder in SOURCE_FOLDERS for p in (ROOT / folder).rglob("*.py")] + list(ROOT.glob("*.py"))
    return {_module_name(p): p for p in files}


def package_of(module: str, modules: dict[str, Path]) -> str:
    """The layer package of a module: its folder, or "scripts" for the top-level files."""
    if "." not in module and modules[module].parent == ROOT:
        return "scripts"
    return module if modules[module].name == "__init__.py" else module.rpartition(".")[0]


def imported_modules(source: str, modules: dict[str, Path], importer: str = "") -> set[str]:
    """Our modules that ``source`` imports anywhere (at the top or inside functions), every name of a
    multi-name import counted: ``from utils import a, b`` imports ``utils.a`` and ``utils.b``."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = importer.split(".")[:len(importer.split(".")) - node.level]
                base = ".".join(package + ([base] if base else []))
            candidates = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                          for alias in node.names]
        else:
            continue
        for name in candidates:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {name: imported_modules(path.read_text(), modules, name) - {name} for name, path in modules.items()}


def layer_problems(graph: dict[str, set[str]], modules: dict[str, Path]) -> list[str]:
    """Upward imports between packages, and import circles between modules."""
    problems = []
    for name, targets in sorted(graph.items()):
        for target in sorted(targets):
            source_package, target_package = package_of(name, modules), package_of(target, modules)
            if RANK[target_package] > RANK[source_package]:
                problems.append(f"{name} ({source_package}) imports {target} ({target_package}), a layer above")
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                problems.append("import circle: " + " -> ".join(trail + [name, target]))
            elif target not in state:
                visit(target, trail + [name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    return problems


def test_every_folder_is_a_layer_and_holds_at_most_twelve_modules():
    modules = _our_modules()
    # An empty __init__.py (utils/, eval/, each layer folder) only makes a folder a package.
    packages = {package_of(name, modules) for name, path in modules.items() if path.read_text().strip()}
    assert packages == set(RANK), f"folders without a layer: {sorted(packages - set(RANK))}; layers without a " \
                                  f"folder: {sorted(set(RANK) - packages)}"
    for package in packages - {"scripts"}:
        direct = [name for name in modules if package_of(name, modules) == package and name != package]
        assert len(direct) <= MAX_MODULES_PER_FOLDER, f"{package} holds {len(direct)} modules: split it"


def test_imports_point_downwards_without_circles():
    modules = _our_modules()
    problems = layer_problems(import_graph(modules), modules)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("source", ["from utils import core, stages", "import utils.core, utils.stages",
                                    "def late():\n    from utils import stages\n"])
def test_the_check_sees_every_name_and_imports_inside_functions(source):
    """utils.stages sits above utils.core: the check catches it as the second name of a multi-name import and
    inside a function, not only as the first name at the top of a module."""
    modules = {"utils.core": ROOT / "utils/core/__init__.py", "utils.stages": ROOT / "utils/stages/__init__.py",
               "utils.core.low": ROOT / "utils/core/low.py"}
    graph = {"utils.core.low": imported_modules(source, modules, "utils.core.low"), "utils.core": set(),
             "utils.stages": set()}
    assert "utils.stages" in graph["utils.core.low"], graph
    assert layer_problems(graph, modules) == [
        "utils.core.low (utils.core) imports utils.stages (utils.stages), a layer above"]


def test_a_circle_is_reported():
    modules = {"utils.core.a": ROOT / "utils/core/a.py", "utils.core.b": ROOT / "utils/core/b.py"}
    graph = {"utils.core.a": {"utils.core.b"}, "utils.core.b": {"utils.core.a"}}
    assert layer_problems(graph, modules) == ["import circle: utils.core.a -> utils.core.b -> utils.core.a"]


# Within the layers, what a line of code should know (ARCHITECTURE): a model knows no files, the loop knows no
# config, RFW loading knows no training index, the pipeline never imports the loop or the stages.
INDEPENDENT = [("config", ("config",), True), ("backbones", ("backbones",), True),
               ("utils.train", ("config",), False), ("eval.rfw.pairs", ("utils.data.index", "utils.data.datasets"), False),
               ("utils.pipeline", ("utils.train", "utils.stages"), False)]


@pytest.mark.parametrize("package, named, only", INDEPENDENT)
def test_independent_parts_do_not_import_each_other(package, named, only):
    """``only``: the package imports nothing of ours outside ``named``; else it imports nothing under ``named``."""
    modules = _our_modules()
    wrong = []
    for name, targets in import_graph(modules).items():
        if name != package and not name.startswith(package + "."):
            continue
        for target in targets:
            inside = any(target == n or target.startswith(n + ".") for n in named)
            if inside != only:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "\n".join(wrong)


# Work-directory names that only utils/workdir/artifacts.py may spell (string literals; docstrings may mention them).
WORK_DIR_NAMES = (".pth", "checkpoint_last", "config.json", "provenance.json", "history.json", "train.log",
                  "index.tsv", "sources.json", "teacher_stores.json", "_flip.npy", "baseline_split", "targets.",
                  "results.json")


def _string_literals(tree: ast.AST) -> list[ast.Constant]:
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [node for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_work_dir_names_are_spelled_only_in_the_artifacts_module():
    offenders = []
    for name, path in _our_modules().items():
        if name in ("utils.workdir.artifacts",) or name.startswith("benchmarks."):
            continue
        for node in _string_literals(ast.parse(path.read_text())):
            if any(token in node.value for token in WORK_DIR_NAMES) or node.value == "tensorboard":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not offenders, "\n".join(offenders)

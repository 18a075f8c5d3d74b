"""The code is arranged in layers that import only downwards (README, "Code layout"), and the work
directory's file names are spelled only in utils/workdir/artifacts.py."""
from __future__ import annotations

import ast
from pathlib import Path

from helpers import ROOT

# Bottom to top. A module may import modules of its own layer (without circles) or of lower layers.
LAYERS: list[tuple[str, list[str]]] = [
    ("ground", ["config.config", "utils.core.errors", "utils.core.io", "utils.core.distributed", "utils.core.logs", "utils.data.image",
                "utils.data.binfile", "utils.data.align", "utils.data.recordio", "eval.metrics.fairness", "utils.core.locks", "utils.core.numerics",
                "utils.core.signals"]),
    ("artifacts", ["utils.workdir.artifacts"]),
    ("models and data", ["backbones", "backbones.adaptors", "backbones.iresnet", "backbones.mobilefacenet",
                         "utils.data.splits", "utils.data.index", "utils.data.synthetic", "eval.rfw.pairs"]),
    ("provenance and measures", ["utils.workdir.provenance", "eval.metrics.protocol", "eval.metrics.reference_protocol",
                                 "eval.metrics.bootstrap", "eval.metrics.operating_point", "eval.report.figures", "eval.report.stats",
                                 "eval.report.seeds", "eval.report.tables"]),
    ("training loop", ["utils.train.heads", "utils.train.monitor", "utils.train.loop"]),
    ("stage logic", ["utils.stages.common", "utils.workdir.store", "utils.stages.adaptor", "utils.stages.student", "utils.stages.cli",
                     "utils.stages.release_import"]),
    ("evaluation and report", ["eval.evaluate", "eval.embed", "eval.export", "eval.kd_targets", "eval.report.sweep"]),
    ("pipeline", ["utils.pipeline.plan"]),
    ("scripts", ["baseline_data_split", "train", "extract_all", "fc_EArc", "dual_layer_EAF-Fusion", "KD_alone",
                 "KD_CEL", "run_pipeline", "benchmarks.adaptor_input", "benchmarks.scan_folder",
                 "benchmarks.train_step", "benchmarks.verification", "benchmarks.bootstrap",
                 "benchmarks.gpu_check"]),
]
LAYER_OF = {module: number for number, (_, modules) in enumerate(LAYERS) for module in modules}
PACKAGES = ("config", "backbones", "utils", "eval", "benchmarks")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _our_modules() -> dict[str, Path]:
    files = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")] + list(ROOT.glob("*.py"))
    modules = {_module_name(p): p for p in files}
    return {name: path for name, path in modules.items() if name not in PACKAGES}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Our modules that ``path`` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
                break
    return found


def test_every_module_has_a_layer():
    missing = sorted(set(_our_modules()) - set(LAYER_OF))
    assert not missing, f"give these modules a layer in tests/test_layers.py (and README, Code layout): {missing}"


def test_imports_point_downwards_without_circles():
    modules = _our_modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items() if name in LAYER_OF}
    upward = [f"{name} ({LAYERS[LAYER_OF[name]][0]}) imports {target} ({LAYERS[LAYER_OF[target]][0]})"
              for name, targets in graph.items() for target in targets if LAYER_OF[target] > LAYER_OF[name]]
    assert not upward, "\n".join(upward)

    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for target in graph[name]:
            assert state.get(target) != 1, "import circle: " + " -> ".join(trail + [name, target])
            if target not in state:
                visit(target, trail + [name])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


# Within a layer, modules that must stay independent of each other (what a line of code should know).
INDEPENDENT = [("config.", "*"), ("eval.rfw.pairs", "utils.data.index"), ("utils.data.synthetic", "eval."),
               ("utils.data.index", "eval."), ("backbones", "utils.data.index")]


def test_independent_modules_do_not_import_each_other():
    modules = _our_modules()
    wrong = []
    for source, target in INDEPENDENT:
        for name, path in modules.items():
            if name == source or name.startswith(source) and source.endswith("."):
                wrong += [f"{name} imports {found}" for found in _imports(path, modules)
                          if target == "*" or found == target or target.endswith(".") and found.startswith(target)]
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

"""Import released weights (the authors' teachers, adaptors, students) into the work directory as finished runs.

    python -m utils.stages.release_import output_root=work_dirs network=iresnet34 teacher_set=specialized \
        --teacher Asian=ASIAN.pth --teacher African=AFRICAN.pth --teacher Caucasian=CAUCASIAN.pth \
        --teacher Indian=INDIAN.pth --adaptor DLDPO=ADAPTOR.pth --student DLDPO_EAFKD=STUDENT.pth

Each file is first loaded into the model its role and the config describe (so a wrong file or network stops
here, naming the missing and unexpected keys; the release's unused ``attention.*``, ``key_vector`` and
``value_vector`` entries of dual adaptors are tolerated), then copied unchanged into the run folder the stages
use (``teachers/<set>/<network>_<member>``, ``adaptors/<set>_<network>/<adaptor>``,
``students/<set>_<network>/<adaptor>_<kd>_<student_network>``) as its best weights, next to the run's
``config.json``, a ``history.json`` that marks the run complete, and ``imported.json``: the provenance record
(role, source file, size, sha256). Extraction, adaptor targets, students and the ``--work-dir`` report then
treat these folders as finished runs. Baseline teachers are named ``split0``..``split3``
(``teacher_set=baseline``). Importing the same file again changes nothing; a folder holding another run or
other weights is refused unless ``--replace``.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from backbones import build_adaptor, build_backbone
from config.config import ADAPTORS, KD_KINDS, Config, load_config, teacher_members
from utils.core.digests import file_sha256
from utils.core.errors import ExistingOutputError, InvalidInputError, MissingInputError, UserError
from utils.core.io import atomic_path, atomic_write_json
from utils.core.weights import load_weights
from utils.workdir import artifacts


@dataclass(frozen=True)
class Import:
    """One weights file and the run it becomes."""

    role: str  # teacher | adaptor | student
    cfg: Config  # the config of that run (member, adaptor, kd set)
    source: Path

    @property
    def run_dir(self) -> Path:
        if self.role == "teacher":
            return artifacts.teacher_dir(self.cfg)
        return artifacts.adaptor_dir(self.cfg) if self.role == "adaptor" else artifacts.student_dir(self.cfg)

    @property
    def label(self) -> str:
        if self.role == "teacher":
            return f"{self.cfg.teacher_set} teacher {self.cfg.teacher_member}"
        if self.role == "adaptor":
            return f"{self.cfg.teacher_set} {self.cfg.adaptor} adaptor"
        return f"{self.cfg.teacher_set} {self.cfg.adaptor} {self.cfg.kd} student"


def parse_named_paths(values: Sequence[str], option: str) -> dict[str, Path]:
    """``NAME=PATH`` words of ``option`` -> ``{name: path}``; a malformed or repeated name is an error."""
    named: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise InvalidInputError(f"{option} {value!r} is not of the form NAME=PATH (e.g. Asian=/path/to/weights)")
        if name in named:
            raise InvalidInputError(f"{option} {name} is given twice ({named[name]} and {path})")
        named[name] = Path(path)
    return named


def plan_imports(cfg: Config, teachers: Mapping[str, Path], adaptors: Mapping[str, Path],
                 students: Mapping[str, Path]) -> list[Import]:
    """The runs the named files become, under ``cfg`` (its teacher_set, networks and output_root)."""
    members = teacher_members(cfg.teacher_set)
    items = []
    for member, path in teachers.items():
        if member not in members:
            raise InvalidInputError(f"--teacher {member}: {cfg.teacher_set} teachers are named {', '.join(members)} "
                             "(set teacher_set=baseline for split0..split3)")
        if member.startswith("split"):
            run_cfg = dataclasses.replace(cfg, split=int(member[len("split"):]))
        else:
            run_cfg = dataclasses.replace(cfg, ethnicity=member)
        items.append(Import("teacher", run_cfg, path))
    for adaptor, path in adaptors.items():
        if adaptor not in ADAPTORS:
            raise InvalidInputError(f"--adaptor {adaptor}: adaptors are {', '.join(ADAPTORS)}")
        items.append(Import("adaptor", dataclasses.replace(cfg, adaptor=adaptor, has_drop_out=adaptor == "DLDPO"),
                            path))
    for name, path in students.items():
        adaptor, _, kd = name.partition("_")
        if adaptor not in ADAPTORS or kd not in KD_KINDS:
            raise InvalidInputError(f"--student {name}: expected <adaptor>_<kd> with adaptor in "
                                    f"{', '.join(ADAPTORS)} and kd in {', '.join(KD_KINDS)} (e.g. DLDPO_EAFKD)")
        items.append(Import("student", dataclasses.replace(cfg, adaptor=adaptor, kd=kd), path))
    if not items:
        raise InvalidInputError("nothing to import: give --teacher, --adaptor or --student NAME=PATH")
    return items


def _check_loads(item: Import) -> None:
    """The file must load strictly into the model of its role (release extras tolerated)."""
    if not item.source.is_file():
        raise MissingInputError(f"{item.label}: weights file {item.source} not found")
    if item.role == "adaptor":
        model = build_adaptor(item.cfg)
    else:
        model = build_backbone(item.cfg, student=item.role == "student")
    load_weights(model, item.source, what=f"{item.label} weights")


def import_all(items: Sequence[Import], *, replace: bool = False) -> list[dict[str, Any]]:
    """Check that every file loads into its model, then import each one (nothing is written if one is wrong)."""
    for item in items:
        _check_loads(item)
    return [_import_one(item, replace=replace) for item in items]


def _import_one(item: Import, *, replace: bool) -> dict[str, Any]:
    """Make ``item.run_dir`` a finished run holding ``item.source`` as its best weights; returns the record."""
    run_dir = item.run_dir
    weights = artifacts.best_weights(run_dir, item.role)
    record = {"role": item.role, "run": item.label, "file": str(item.source.resolve()),
              "size": item.source.stat().st_size, "sha256": file_sha256(item.source)}
    previous = artifacts.imported_file(run_dir)
    if previous.is_file() and weights.is_file() and file_sha256(weights) == record["sha256"]:
        return record  # the same weights are already there
    if run_dir.exists() and any(run_dir.iterdir()):
        if not replace:
            what = "an earlier import" if previous.is_file() else "a run or other files"
            raise ExistingOutputError(f"{run_dir} already holds {what}; pass --replace to overwrite it with "
                                  f"{item.source}")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(weights) as tmp:
        shutil.copyfile(item.source, tmp)
    config = item.cfg.to_dict()
    config["derived"]["stage"] = item.role
    atomic_write_json(artifacts.config_file(run_dir), config)
    atomic_write_json(artifacts.history_file(run_dir), {"epochs": [], "best": {"epoch": None, "global_step": None,
                                                                  "imported": True},
                                           "complete": True})
    atomic_write_json(previous, record)  # last: its presence marks a complete import
    return record


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m utils.stages.release_import", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (config/config.py)")
    parser.add_argument("--teacher", action="append", default=[], metavar="MEMBER=PATH",
                        help="a teacher: Asian|African|Caucasian|Indian (baseline: split0..split3)")
    parser.add_argument("--adaptor", action="append", default=[], metavar="ADAPTOR=PATH", help="SL|DuL|DLDPO")
    parser.add_argument("--student", action="append", default=[], metavar="ADAPTOR_KD=PATH",
                        help="e.g. DLDPO_EAFKD or SL_aKD")
    parser.add_argument("--replace", action="store_true", help="overwrite run folders that hold something else")
    return parser


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.overrides)
        items = plan_imports(cfg, parse_named_paths(args.teacher, "--teacher"),
                             parse_named_paths(args.adaptor, "--adaptor"), parse_named_paths(args.student, "--student"))
        records = import_all(items, replace=args.replace)
        for item, record in zip(items, records):
            print(f"imported {item.label}: {item.source} -> {item.run_dir} (sha256 {record['sha256'][:12]})")
    except (UserError, KeyError, ValueError) as exc:
        raise SystemExit(f"error: {exc.args[0] if exc.args else exc}") from None
    return records


if __name__ == "__main__":
    main()

"""Evaluate checkpoints on the four RFW subsets and write a results table with plots.

Three modes (exactly one):

  one backbone       --backbone W.pth --network iresnet34
  multi-teacher      --teachers ASIAN.pth AFRICAN.pth CAUCASIAN.pth INDIAN.pth --teacher-network iresnet34
                     --adaptor A.pth --adaptor-type SL|DuL|DLDPO
  a work directory   --work-dir work_dirs   (every run with a config.json: teachers and students are
                     evaluated from best_backbone.pth; adaptors from best_adaptor.pth over their four
                     teachers' best_backbone.pth)

Released checkpoints (plain state_dicts with the authors' parameter names) load as they are.
Example: python -m eval.evaluate --backbone student.pth --network iresnet34 --rfw-root data/rfw
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from backbones import ADAPTORS, BACKBONES, build_adaptor, build_backbone, get_adaptor, get_backbone, load_weights
from config.config import BASELINE_CONCAT_ORDER, CONCAT_ORDER, Config, load_config, teacher_members
from eval.report import ResultRow, results_table, write_report
from eval.verification import EmbedFn, RFWEvaluator, VerificationResult, backbone_embed_fn, multi_teacher_embed_fn

WEIGHTS_FILE = {"teacher": "best_backbone.pth", "student": "best_backbone.pth", "adaptor": "best_adaptor.pth"}
STAGE_ORDER = ("teacher", "adaptor", "student")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def result_row(name: str, results: Mapping[str, VerificationResult],
               extra: Mapping[str, Any] | None = None) -> ResultRow:
    """Table row from per-ethnicity results: accuracies in %, per-ethnicity details in ``extra``, ROC curves."""
    details: dict[str, Any] = dict(extra or {})
    for eth, result in results.items():
        details.update({f"{eth}/{key}": value for key, value in result.summary().items() if key != "accuracy"})
    degenerate = [f"{eth}: {result.degenerate}" for eth, result in results.items() if result.degenerate]
    if degenerate:
        details["degenerate"] = "; ".join(degenerate)
    return ResultRow(
        name=name,
        accuracies={eth: 100.0 * result.accuracy for eth, result in results.items()},
        extra=details,
        curves={eth: (result.fpr, result.tpr) for eth, result in results.items()},
    )


def _evaluate(name: str, embed_fn: EmbedFn, models: Sequence[nn.Module], evaluator: RFWEvaluator,
              device: torch.device, extra: Mapping[str, Any]) -> ResultRow:
    for model in models:
        model.to(device)
    return result_row(name, evaluator(embed_fn, device), extra)


def evaluate_backbone(
    weights: str | Path,
    network: str,
    evaluator: RFWEvaluator,
    *,
    embedding_size: int = 512,
    width: int = 64,
    use_se: bool = False,
    device: str | torch.device | None = None,
    name: str | None = None,
) -> ResultRow:
    """One backbone checkpoint on RFW; the input size is the evaluator's."""
    device = torch.device(device) if device is not None else default_device()
    model = get_backbone(network, input_size=evaluator.input_size, embedding_size=embedding_size,
                         use_se=use_se, width=width)
    load_weights(model, weights, what=f"{network} backbone weights")
    extra = {"network": network, "weights": str(weights)}
    return _evaluate(name or str(weights), backbone_embed_fn(model), [model], evaluator, device, extra)


def evaluate_multi_teacher(
    teacher_weights: Sequence[str | Path],
    adaptor_weights: str | Path,
    adaptor_type: str,
    evaluator: RFWEvaluator,
    *,
    teacher_network: str = "iresnet34",
    embedding_size: int = 512,
    width: int = 64,
    use_se: bool = False,
    device: str | torch.device | None = None,
    name: str | None = None,
    raw_teachers: bool = False,
) -> ResultRow:
    """The multi-teacher space: four teachers in CONCAT_ORDER (Asian, African, Caucasian, Indian) + adaptor.

    ``raw_teachers``: concatenate unnormalised teacher outputs, as the release's adaptor evaluation did."""
    if len(teacher_weights) != len(CONCAT_ORDER):
        listed = ", ".join(map(str, teacher_weights))
        raise ValueError(f"expected {len(CONCAT_ORDER)} teacher checkpoints in the order "
                         f"{', '.join(CONCAT_ORDER)}, got {len(teacher_weights)}: {listed}")
    device = torch.device(device) if device is not None else default_device()
    teachers = []
    for member, path in zip(CONCAT_ORDER, teacher_weights):
        model = get_backbone(teacher_network, input_size=evaluator.input_size, embedding_size=embedding_size,
                             use_se=use_se, width=width)
        teachers.append(load_weights(model, path, what=f"{member} teacher ({teacher_network}) weights"))
    adaptor = get_adaptor(adaptor_type, in_features=len(teachers) * embedding_size, embedding_size=embedding_size)
    load_weights(adaptor, adaptor_weights, what=f"{adaptor_type} adaptor weights")
    extra = {"network": teacher_network, "adaptor": adaptor_type, "weights": str(adaptor_weights),
             "teachers": " ".join(map(str, teacher_weights)), "raw_teachers": raw_teachers}
    return _evaluate(name or f"{adaptor_type} multi-teacher space",
                     multi_teacher_embed_fn(teachers, adaptor, raw_teachers=raw_teachers),
                     [*teachers, adaptor], evaluator, device, extra)


# ---- work directories -----------------------------------------------------------------------------------

def read_run_config(run_dir: Path) -> tuple[Config, str | None]:
    """The run's Config and its stage (None when the config.json records no training stage)."""
    path = run_dir / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read run config {path}: {exc}") from exc
    stage = data.pop("derived", {}).get("stage")
    try:
        cfg = load_config(data)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"run config {path} does not fit config/config.py: {exc}") from exc
    return cfg, stage


def _weights(run_dir: Path, stage: str, role: str) -> Path:
    path = run_dir / WEIGHTS_FILE[stage]
    if not path.is_file():
        raise FileNotFoundError(f"{role} run {run_dir} has no {WEIGHTS_FILE[stage]} (training not finished?)")
    return path


def _teacher_dirs(run_dir: Path, cfg: Config) -> list[Path]:
    """Teacher run folders of an adaptor run, looked up in the work directory the adaptor run sits in."""
    recorded = cfg.adaptor_dir.relative_to(cfg.work_root)
    depth = len(recorded.parts)
    if run_dir.parts[-depth:] == recorded.parts:
        root = run_dir.parents[depth - 1]
    else:  # the run folder was moved out of its work directory: trust the recorded output_root
        root = cfg.work_root
    return [root / cfg.teacher_dir(m).relative_to(cfg.work_root) for m in teacher_members(cfg.teacher_set)]


def _load_teacher(teacher_dir: Path, adaptor_cfg: Config, adaptor_run: Path) -> nn.Module:
    """A teacher of an adaptor run, built from its own config.json, or from the adaptor's config when the
    folder only holds weights put there by hand (the authors' released teachers)."""
    cfg = adaptor_cfg
    if (teacher_dir / "config.json").is_file():
        cfg, _ = read_run_config(teacher_dir)
        if cfg.input_size != adaptor_cfg.input_size:
            raise ValueError(f"teacher run {teacher_dir} has input_size {cfg.input_size}, adaptor run "
                             f"{adaptor_run} has {adaptor_cfg.input_size}")
    model = build_backbone(cfg)
    return load_weights(model, _weights(teacher_dir, "teacher", "teacher"), what="teacher weights")


def find_runs(work_dir: str | Path) -> list[tuple[Path, Config, str]]:
    """Every teacher/adaptor/student run under ``work_dir``: ``(run_dir, config, stage)``, teachers first."""
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        raise FileNotFoundError(f"work directory {work_dir} does not exist")
    runs = []
    for path in sorted(work_dir.rglob("config.json")):
        cfg, stage = read_run_config(path.parent)
        if stage in STAGE_ORDER:
            runs.append((path.parent, cfg, stage))
    runs.sort(key=lambda run: (STAGE_ORDER.index(run[2]), str(run[0])))
    return runs


def evaluate_run(run_dir: Path, cfg: Config, stage: str, evaluator: RFWEvaluator, *, name: str,
                 device: str | torch.device | None = None, raw_teachers: bool = False) -> ResultRow:
    """One training run: its best weights (adaptors: with their four teachers' best weights, in
    ``teacher_members`` order; ``raw_teachers`` as in :func:`multi_teacher_embed_fn`)."""
    if cfg.input_size != evaluator.input_size:
        raise ValueError(f"run {run_dir} has input_size {cfg.input_size}, the RFW evaluator {evaluator.input_size}")
    device = torch.device(device) if device is not None else default_device()
    weights = _weights(run_dir, stage, stage)
    extra: dict[str, Any] = {"stage": stage, "weights": str(weights)}
    if stage == "adaptor":
        teachers = [_load_teacher(d, cfg, run_dir) for d in _teacher_dirs(run_dir, cfg)]
        adaptor = load_weights(build_adaptor(cfg), weights, what=f"{cfg.adaptor} adaptor weights")
        extra.update(network=cfg.network, adaptor=cfg.adaptor, raw_teachers=raw_teachers)
        return _evaluate(name, multi_teacher_embed_fn(teachers, adaptor, raw_teachers=raw_teachers),
                         [*teachers, adaptor], evaluator, device, extra)
    model = build_backbone(cfg, student=stage == "student")
    load_weights(model, weights, what=f"{stage} weights")
    extra["network"] = cfg.student_network if stage == "student" else cfg.network
    return _evaluate(name, backbone_embed_fn(model), [model], evaluator, device, extra)


def evaluate_work_dir(
    work_dir: str | Path,
    rfw_root: str | Path,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    skip_incomplete: bool = False,
    raw_teachers: bool = False,
) -> list[ResultRow]:
    """Evaluate every run under ``work_dir`` (found by config.json); rows named by their relative path.

    Each run is rebuilt from its own config (network, width, input size, embedding size). With
    ``skip_incomplete`` a run without its best weights is reported and skipped instead of failing.
    """
    work_dir = Path(work_dir)
    runs = find_runs(work_dir)
    if not runs:
        raise FileNotFoundError(f"no training runs (config.json with a stage) under {work_dir}")
    evaluators: dict[int, RFWEvaluator] = {}
    rows = []
    for run_dir, cfg, stage in runs:
        if cfg.input_size not in evaluators:
            evaluators[cfg.input_size] = RFWEvaluator(rfw_root, cfg.input_size, batch_size=batch_size)
        name = run_dir.relative_to(work_dir).as_posix()
        try:
            rows.append(evaluate_run(run_dir, cfg, stage, evaluators[cfg.input_size], name=name, device=device,
                                     raw_teachers=raw_teachers))
        except FileNotFoundError as exc:
            if not skip_incomplete:
                raise
            print(f"skipping {name}: {exc}")
    if not rows:
        raise FileNotFoundError(f"no run under {work_dir} has finished weights")
    return rows


# ---- command line ---------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Metrics: per-ethnicity 10-fold verification accuracy (%) with flip TTA; Avg; STD = population "
               "std of the four accuracies; SER = (100 - min acc) / (100 - max acc). Lower STD/SER = fairer. "
               "The JSON/CSV also hold TAR@FAR=1e-3/1e-4 and ROC AUC per ethnicity.",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--backbone", type=Path, metavar="PATH", help="one backbone weights file")
    mode.add_argument("--teachers", type=Path, nargs="+", metavar="PATH",
                      help=f"exactly four teacher weights files in concatenation order: {', '.join(CONCAT_ORDER)} "
                           f"(baseline teachers: {' '.join(BASELINE_CONCAT_ORDER)}); needs --adaptor and --adaptor-type")
    mode.add_argument("--work-dir", type=Path, metavar="DIR",
                      help="evaluate every run under DIR, each rebuilt from its own config.json "
                           "(--network/--input-size/--embedding-size/--width are then not used)")
    parser.add_argument("--network", default="iresnet34", choices=BACKBONES, help="network of --backbone")
    parser.add_argument("--teacher-network", default="iresnet34", choices=BACKBONES, help="network of --teachers")
    parser.add_argument("--adaptor", type=Path, metavar="PATH", help="adaptor weights file (with --teachers)")
    parser.add_argument("--adaptor-type", choices=ADAPTORS, help="adaptor architecture (with --teachers)")
    parser.add_argument("--rfw-root", type=Path, required=True, metavar="DIR",
                        help="folder with African_test.bin, Asian_test.bin, Caucasian_test.bin, Indian_test.bin")
    parser.add_argument("--input-size", type=int, default=112, help="image side fed to the network")
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--width", type=int, default=64, help="backbone base width (64 = paper networks)")
    parser.add_argument("--use-se", action="store_true", help="iResNet with squeeze-and-excitation blocks")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="report folder (default: <work-dir>/reports, else ./eval_results)")
    parser.add_argument("--name", help="row name of the evaluated model (--backbone / --teachers)")
    parser.add_argument("--release-raw-teachers", action="store_true",
                        help="adaptor rows: concatenate the teachers' unnormalised outputs, as the release's "
                             "adaptor evaluation did (default: L2-normalised, as the adaptors were trained)")
    parser.add_argument("--skip-incomplete", action="store_true",
                        help="--work-dir: skip runs without best weights instead of failing")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.teachers is not None:
        if len(args.teachers) != len(CONCAT_ORDER):
            parser.error(f"--teachers needs exactly {len(CONCAT_ORDER)} weights files in the order "
                         f"{', '.join(CONCAT_ORDER)}; got {len(args.teachers)}: {' '.join(map(str, args.teachers))}")
        if args.adaptor is None or args.adaptor_type is None:
            parser.error("--teachers needs --adaptor PATH and --adaptor-type SL|DuL|DLDPO")
    elif args.adaptor is not None or args.adaptor_type is not None:
        parser.error("--adaptor/--adaptor-type only apply with --teachers")
    if args.release_raw_teachers and args.backbone is not None:
        parser.error("--release-raw-teachers applies to adaptors (--teachers or --work-dir), not --backbone")
    if args.work_dir is not None and args.name is not None:
        parser.error("--name applies to --backbone/--teachers; --work-dir names rows by run folder")


def main(argv: Sequence[str] | None = None) -> list[ResultRow]:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    try:
        if args.work_dir is not None:
            rows = evaluate_work_dir(args.work_dir, args.rfw_root, batch_size=args.batch_size, device=args.device,
                                     skip_incomplete=args.skip_incomplete, raw_teachers=args.release_raw_teachers)
        else:
            evaluator = RFWEvaluator(args.rfw_root, args.input_size, batch_size=args.batch_size)
            common = dict(embedding_size=args.embedding_size, width=args.width, use_se=args.use_se,
                          device=args.device, name=args.name)
            if args.backbone is not None:
                rows = [evaluate_backbone(args.backbone, args.network, evaluator, **common)]
            else:
                rows = [evaluate_multi_teacher(args.teachers, args.adaptor, args.adaptor_type, evaluator,
                                               teacher_network=args.teacher_network,
                                               raw_teachers=args.release_raw_teachers, **common)]
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    out = args.out or (args.work_dir / "reports" if args.work_dir is not None else Path("eval_results"))
    paths = write_report(rows, out)
    print(results_table(rows))
    print(f"report written to {out}: {', '.join(p.name for p in paths.values())}")
    return rows


if __name__ == "__main__":
    main()

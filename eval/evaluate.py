"""Evaluate checkpoints on the four RFW subsets and write a results table with plots.

Three modes (exactly one):

  one backbone       --backbone W.pth --network iresnet34
  multi-teacher      --teacher Asian=A.pth --teacher African=B.pth --teacher Caucasian=C.pth
                     --teacher Indian=D.pth --teacher-network iresnet34 --adaptor A.pth --adaptor-type SL|DuL|DLDPO
                     (balanced baseline teachers: --teacher split0=... split1=... split2=... split3=...;
                     teachers are named, in any order: the code applies the concatenation order)
  a work directory   --work-dir work_dirs   (every run with a config.json: teachers and students are
                     evaluated from their best backbone weights; adaptors from their best weights over their
                     four teachers' best weights; the same report the pipeline writes, in <work-dir>/report)

Released checkpoints (plain state_dicts with the authors' parameter names) load as they are.
--rfw-root: a folder of <Ethnicity>_test.bin, or the RFW archive root (or its test/ folder), whose images are
aligned from the <Race>_lmk.txt landmarks. --val-targets lfw cfp_fp agedb_30 ... with --val-root DIR adds
insightface .bin benchmarks as extra columns.
Example: python -m eval.evaluate --backbone student.pth --network iresnet34 --rfw-root data/rfw
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from backbones import BACKBONES, build_adaptor, build_backbone, get_adaptor, get_backbone
from config.config import (
    ADAPTORS, CONCAT_ORDER, ETHNICITIES, MAX_IMAGE_PIXELS, TEACHER_SETS, Config, teacher_members
)
from eval.metrics.protocol import VerificationResult
from eval.report.stats import StatsSettings, report_stats
from eval.report.tables import ResultRow, read_report_rows, results_table, summary_line, write_report
from eval.rfw.embedding import (
    EmbedFn, ImageOutputs, RFWEvaluator, adaptor_outputs, backbone_embed_fn, multi_teacher_embed_fn
)
from eval.rfw.pairs import find_benchmark
from utils.core.digests import file_sha256
from utils.core.distributed import default_device
from utils.core.errors import InvalidInputError, MissingInputError
from utils.core.io import atomic_write_json, output_folder
from utils.core.locks import folder_lock
from utils.core.progress import progress
from utils.core.weights import load_weights
from utils.stages.cli import add_max_image_pixels, run_tool
from utils.stages.release_import import parse_named_paths
from utils.workdir import artifacts
from utils.workdir.provenance import tree_fingerprint
from utils.workdir.runs import display_name, find_runs, read_run_config, run_weights, teacher_dirs


def result_row(name: str, results: Mapping[str, VerificationResult],
               extra: Mapping[str, Any] | None = None) -> ResultRow:
    """Table row from per-ethnicity results: accuracies in %, per-ethnicity details in ``extra``, the RFW pairs."""
    details: dict[str, Any] = dict(extra or {})
    for eth, result in results.items():
        details.update({f"{eth}/{key}": value for key, value in result.summary().items() if key != "accuracy"})
    degenerate = [f"{eth}: {result.degenerate}" for eth, result in results.items() if result.degenerate]
    if degenerate:
        details["degenerate"] = "; ".join(degenerate)
    return ResultRow(
        name=name,
        accuracies={eth: 100.0 * result.accuracy for eth, result in results.items() if eth in ETHNICITIES},
        extra=details,
        pairs={eth: (result.distances, result.issame) for eth, result in results.items() if eth in ETHNICITIES},
        benchmarks={key: 100.0 * result.accuracy for key, result in results.items() if key not in ETHNICITIES},
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


def ordered_teachers(named: Mapping[str, str | Path]) -> tuple[str, list[tuple[str, Path]]]:
    """The teacher set named by ``{member: weights}`` and its members in concatenation order.

    Specialized teachers are named by ethnicity, balanced baseline teachers ``split0``..``split3``; all four
    of one set must be given, nothing else. The order comes from ``config.teacher_members``, never from
    the order the names were given in.
    """
    for teacher_set in TEACHER_SETS:
        members = teacher_members(teacher_set)
        if set(named) & set(members):
            unknown = sorted(set(named) - set(members))
            missing = [m for m in members if m not in named]
            if unknown or missing:
                problems = ([f"unknown {', '.join(unknown)}"] if unknown else []) + \
                           ([f"missing {', '.join(missing)}"] if missing else [])
                raise ValueError(f"{teacher_set} teachers must be named {', '.join(members)}: {'; '.join(problems)}")
            return teacher_set, [(m, Path(named[m])) for m in members]
    sets = "; ".join(f"{s}: {', '.join(teacher_members(s))}" for s in TEACHER_SETS)
    raise ValueError(f"unknown teacher names {', '.join(sorted(named)) or '(none)'}: expected the four of one set "
                     f"({sets})")


def evaluate_multi_teacher(
    teacher_weights: Mapping[str, str | Path],
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
    """The multi-teacher space: four named teachers (``{member: weights}``, see :func:`ordered_teachers`),
    concatenated in the set's order, and the adaptor.

    ``raw_teachers``: concatenate unnormalised teacher outputs, as the release's adaptor evaluation did."""
    teacher_set, ordered = ordered_teachers(teacher_weights)
    device = torch.device(device) if device is not None else default_device()
    teachers = []
    for member, path in ordered:
        model = get_backbone(teacher_network, input_size=evaluator.input_size, embedding_size=embedding_size,
                             use_se=use_se, width=width)
        teachers.append(load_weights(model, path, what=f"{member} teacher ({teacher_network}) weights"))
    adaptor = get_adaptor(adaptor_type, in_features=len(teachers) * embedding_size, embedding_size=embedding_size)
    load_weights(adaptor, adaptor_weights, what=f"{adaptor_type} adaptor weights")
    extra = {"network": teacher_network, "adaptor": adaptor_type, "weights": str(adaptor_weights),
             "teacher_set": teacher_set, "teachers": " ".join(f"{m}={p}" for m, p in ordered),
             "raw_teachers": raw_teachers}
    return _evaluate(name or f"{adaptor_type} multi-teacher space",
                     multi_teacher_embed_fn(teachers, adaptor, raw_teachers=raw_teachers),
                     [*teachers, adaptor], evaluator, device, extra)


# ---- work directories -----------------------------------------------------------------------------------

def _load_teacher(teacher_dir: Path, adaptor_cfg: Config, adaptor_run: Path) -> nn.Module:
    """A teacher of an adaptor run, built from its own config.json, or from the adaptor's config when the
    folder only holds weights put there by hand (the authors' released teachers)."""
    cfg = adaptor_cfg
    if artifacts.config_file(teacher_dir).is_file():
        cfg, _ = read_run_config(teacher_dir)
        if cfg.input_size != adaptor_cfg.input_size:
            raise InvalidInputError(f"teacher run {teacher_dir} has input_size {cfg.input_size}, adaptor run "
                                    f"{adaptor_run} has {adaptor_cfg.input_size}")
    model = build_backbone(cfg)
    return load_weights(model, run_weights(teacher_dir, "teacher", "teacher"), what="teacher weights")


class TeacherOutputs:
    """RFW outputs of teacher weights, computed once per report: a teacher's own row and each adaptor space
    built on it read the same outputs (an adaptor row would otherwise run its four teachers again). An entry is
    dropped after its last reader, so at most the teachers still to be read are held."""

    def __init__(self, evaluator: RFWEvaluator, device: torch.device, readers: Counter[Path]) -> None:
        self.evaluator = evaluator
        self.device = device
        self._readers = readers
        self._outputs: dict[Path, dict[str, ImageOutputs]] = {}

    def read(self, weights: Path, load: Callable[[], nn.Module]) -> dict[str, ImageOutputs]:
        weights = weights.resolve()
        if weights not in self._outputs:
            model = load().to(self.device)
            self._outputs[weights] = self.evaluator.outputs(backbone_embed_fn(model), self.device)
        self._readers[weights] -= 1
        if self._readers[weights] > 0:
            return self._outputs[weights]
        return self._outputs.pop(weights)


def teacher_readers(runs: Sequence[tuple[Path, Config, str]]) -> Counter[Path]:
    """How many report rows read each teacher's weights: its own row and the adaptor rows over it."""
    readers: Counter[Path] = Counter()
    for run_dir, cfg, stage in runs:
        if stage == "teacher":
            readers[artifacts.best_weights(run_dir, "teacher").resolve()] += 1
        elif stage == "adaptor":
            readers.update(artifacts.best_weights(d, "teacher").resolve() for d in teacher_dirs(run_dir, cfg))
    return readers


def evaluate_run(run_dir: Path, cfg: Config, stage: str, teachers: TeacherOutputs, *, name: str,
                 raw_teachers: bool = False) -> ResultRow:
    """One training run: its best weights (adaptors: with their four teachers' best weights, in
    ``teacher_members`` order; ``raw_teachers`` as in :func:`multi_teacher_embed_fn`). ``teachers`` holds the
    evaluator and device, and shares teacher outputs between rows."""
    evaluator, device = teachers.evaluator, teachers.device
    if cfg.input_size != evaluator.input_size:
        raise InvalidInputError(f"run {run_dir} has input_size {cfg.input_size}, the RFW evaluator "
                                f"{evaluator.input_size}")
    weights = run_weights(run_dir, stage, stage)
    extra: dict[str, Any] = {"stage": stage, "weights": str(weights), "run_dir": str(run_dir),
                             "teacher_set": cfg.teacher_set}
    extra.update({"teacher": {"member": cfg.teacher_member}, "student": {"adaptor": cfg.adaptor, "kd": cfg.kd}}.get(
        stage, {}))  # what the report's comparison and figures group by
    if stage == "adaptor":
        members = [teachers.read(run_weights(d, "teacher", "teacher"), lambda d=d: _load_teacher(d, cfg, run_dir))
                   for d in teacher_dirs(run_dir, cfg)]
        adaptor = load_weights(build_adaptor(cfg), weights, what=f"{cfg.adaptor} adaptor weights").to(device)
        extra.update(network=cfg.network, adaptor=cfg.adaptor, raw_teachers=raw_teachers)
        outputs = {pairs: adaptor_outputs([member[pairs] for member in members], adaptor, raw_teachers=raw_teachers,
                                          batch_size=evaluator.batch_size, device=device) for pairs in members[0]}
        return result_row(name, evaluator.verify_outputs(outputs), extra)
    if stage == "teacher":
        extra["network"] = cfg.network
        outputs = teachers.read(weights, lambda: load_weights(build_backbone(cfg), weights, what="teacher weights"))
        return result_row(name, evaluator.verify_outputs(outputs), extra)
    model = build_backbone(cfg, student=True)
    load_weights(model, weights, what=f"{stage} weights")
    extra["network"] = cfg.student_network
    return _evaluate(name, backbone_embed_fn(model), [model], evaluator, device, extra)


def _sources(runs: Sequence[tuple[Path, Config, str]], work_dir: Path, rfw_root: Path,
             raw_teachers: bool) -> dict[str, Any]:
    """What a report is computed from: the RFW files, each run's config and evaluated weights (content), and
    how adaptor spaces were evaluated."""
    def weights_sha(path: Path) -> str | None:
        return file_sha256(path) if path.is_file() else None

    entries = []
    for run_dir, cfg, stage in runs:
        files = [artifacts.best_weights(run_dir, stage)]
        if stage == "adaptor":
            files += [artifacts.best_weights(d, "teacher") for d in teacher_dirs(run_dir, cfg)]
        entries.append({"run": run_dir.relative_to(work_dir).as_posix(), "stage": stage,
                        "config": file_sha256(artifacts.config_file(run_dir)),
                        "weights": [weights_sha(path) for path in files]})
    return {"rfw": tree_fingerprint(rfw_root), "runs": entries, "raw_teachers": raw_teachers}


@dataclass
class WorkDirReport:
    rows: list[ResultRow]
    out_dir: Path
    text: str  # the table and the summary, as printed
    reused: bool  # True when nothing changed since the report in out_dir was written


def _evaluate_runs(runs: Sequence[tuple[Path, Config, str]], work_dir: Path, rfw_root: Path, options: dict[str, Any],
                   *, batch_size: int, device: str | torch.device | None, skip_incomplete: bool,
                   raw_teachers: bool) -> list[ResultRow]:
    """One result row per run, evaluated on RFW (one evaluator and its shared teacher outputs per input size)."""
    device = torch.device(device) if device is not None else default_device()
    readers = teacher_readers(runs)
    by_size: dict[int, TeacherOutputs] = {}
    rows = []
    for run_dir, cfg, stage in progress(runs, desc="report: evaluating runs on RFW"):
        if cfg.input_size not in by_size:
            evaluator = RFWEvaluator(rfw_root, cfg.input_size, batch_size=batch_size, **options)
            by_size[cfg.input_size] = TeacherOutputs(evaluator, device, readers)
        name = display_name(stage, cfg)
        try:
            rows.append(evaluate_run(run_dir, cfg, stage, by_size[cfg.input_size], name=name,
                                     raw_teachers=raw_teachers))
        except FileNotFoundError as exc:
            if not skip_incomplete:
                raise
            print(f"skipping {name}: {exc}")
    if not rows:
        raise MissingInputError(f"no run under {work_dir} has finished weights")
    return rows


def report_work_dir(work_dir: str | Path, rfw_root: str | Path, *, run_name: str | None = None,
                    out_dir: str | Path | None = None, batch_size: int = 256,
                    device: str | torch.device | None = None, skip_incomplete: bool = False,
                    raw_teachers: bool = False, settings: StatsSettings | None = None, allow_resize: bool = False,
                    val_root: str | Path | None = None, val_targets: Sequence[str] = (),
                    max_pixels: int = MAX_IMAGE_PIXELS) -> WorkDirReport:
    """Evaluate every run under ``work_dir`` (of ``run_name``, if given) on RFW and write one report folder.

    Each run is rebuilt from its own config.json. The report folder (default ``report[-run_name]`` in the
    work dir, locked while it is written) holds the tables, plots and ``sources.json``: when the RFW files and
    every evaluated weights file are unchanged, the rows there are reused without evaluating again, and the files
    are rewritten only when the statistics ``settings`` changed. With ``skip_incomplete`` a run
    without its best weights is reported and skipped instead of failing; ``raw_teachers`` evaluates adaptor
    spaces as in :func:`multi_teacher_embed_fn`. ``settings``: bootstrap and operating points of the report.
    ``val_targets`` (``<val_root>/<name>.bin``) add benchmark columns; ``allow_resize`` and ``max_pixels`` as in
    :class:`RFWEvaluator`.
    """
    work_dir, rfw_root = Path(work_dir), Path(rfw_root)
    if not rfw_root.is_dir():
        raise MissingInputError(f"rfw_root {rfw_root} is not a folder (expected <Ethnicity>_test.bin files or the "
                                "RFW archive)")
    runs = find_runs(work_dir, run_name)
    if not runs:
        raise MissingInputError(f"no training runs ({artifacts.CONFIG_FILE} with a stage) under {work_dir}")
    out = Path(out_dir) if out_dir is not None else artifacts.report_folder(work_dir, run_name or "")
    options = {"allow_resize": allow_resize, "val_root": val_root, "val_targets": list(val_targets),
               "max_pixels": max_pixels}
    sources = _sources(runs, work_dir, rfw_root, raw_teachers)
    if val_targets:
        benchmarks = {name: find_benchmark(val_root, name) for name in val_targets}  # type: ignore[arg-type]
        sources["benchmarks"] = {name: file_sha256(path) for name, path in benchmarks.items()}
    sources["allow_resize"] = allow_resize
    settings = settings or StatsSettings()
    # The report files follow the statistics settings too; the evaluated rows only follow the sources.
    wanted = {**sources, "report_settings": json.loads(json.dumps(asdict(settings)))}
    sources_path = artifacts.report_sources_file(out)
    with output_folder(out), folder_lock(out, "report folder"):
        recorded = json.loads(sources_path.read_text()) if sources_path.is_file() else None
        reused = recorded == wanted
        if recorded is not None and {k: v for k, v in recorded.items() if k != "report_settings"} == sources:
            rows = read_report_rows(out / f"{artifacts.REPORT_STEM}.json")
        else:
            rows = _evaluate_runs(runs, work_dir, rfw_root, options, batch_size=batch_size, device=device,
                                  skip_incomplete=skip_incomplete, raw_teachers=raw_teachers)
        stats = report_stats(rows, settings)  # before the table: it gives the rows (also reused ones) their intervals
        if not reused:
            write_report(rows, out, stem=artifacts.REPORT_STEM, settings=settings, stats=stats)
            atomic_write_json(sources_path, wanted)
    summary = summary_line(rows, stats=stats)
    return WorkDirReport(rows, out, results_table(rows) + "\n\n" + summary, reused)


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
    mode.add_argument("--teacher", action="append", metavar="NAME=PATH",
                      help=f"a named teacher weights file, given four times: {', '.join(CONCAT_ORDER)} (or the "
                           "baseline split0..split3), in any order; needs --adaptor and --adaptor-type")
    mode.add_argument("--work-dir", type=Path, metavar="DIR",
                      help=f"evaluate every run under DIR, each rebuilt from its own {artifacts.CONFIG_FILE} "
                           "(--network/--input-size/--embedding-size/--width are then not used)")
    parser.add_argument("--network", default="iresnet34", choices=BACKBONES, help="network of --backbone")
    parser.add_argument("--teacher-network", default="iresnet34", choices=BACKBONES, help="network of --teacher")
    parser.add_argument("--adaptor", type=Path, metavar="PATH", help="adaptor weights file (with --teacher)")
    parser.add_argument("--adaptor-type", choices=ADAPTORS, help="adaptor architecture (with --teacher)")
    parser.add_argument("--rfw-root", type=Path, required=True, metavar="DIR",
                        help="folder with <Ethnicity>_test.bin files, or the RFW archive root (or its test/)")
    parser.add_argument("--val-targets", nargs="+", default=[], metavar="NAME",
                        help="insightface .bin benchmarks to add as columns (lfw cfp_fp agedb_30 calfw cplfw ...)")
    parser.add_argument("--val-root", type=Path, metavar="DIR", help="folder holding <NAME>.bin of --val-targets")
    parser.add_argument("--allow-resize", action="store_true",
                        help="resize images that are not --input-size squares instead of refusing them as unaligned")
    add_max_image_pixels(parser)
    parser.add_argument("--input-size", type=int, default=112, help="image side fed to the network")
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--width", type=int, default=64, help="backbone base width (64 = paper networks)")
    parser.add_argument("--use-se", action="store_true", help="iResNet with squeeze-and-excitation blocks")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="report folder (default: <work-dir>/report[-RUN_NAME], else ./eval_results)")
    parser.add_argument("--run-name", default=None,
                        help="--work-dir: only the runs of this run_name (default: every run)")
    parser.add_argument("--name", help="row name of the evaluated model (--backbone / --teacher)")
    parser.add_argument("--release-raw-teachers", action="store_true",
                        help="adaptor rows: concatenate the teachers' unnormalised outputs, as the release's "
                             "adaptor evaluation did (default: L2-normalised, as the adaptors were trained)")
    parser.add_argument("--skip-incomplete", action="store_true",
                        help="--work-dir: skip runs without best weights instead of failing")
    stats = StatsSettings()
    parser.add_argument("--bootstrap-resamples", type=int, default=stats.n_resamples,
                        help="bootstrap resamples of the RFW pairs for the intervals and comparisons")
    parser.add_argument("--bootstrap-seed", type=int, default=stats.seed, help="seed of the resampling plan")
    parser.add_argument("--confidence", type=float, default=stats.confidence, help="level of the intervals")
    parser.add_argument("--fmr-targets", type=float, nargs="+", default=list(stats.fmr_targets),
                        help="pooled FMRs that set the global thresholds of the operating-point tables")
    parser.add_argument("--fdr-alpha", type=float, default=stats.fdr_alpha,
                        help="weight of the FMR gap in the Fairness Discrepancy Rate")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.teacher is not None:
        try:
            args.teacher = parse_named_paths(args.teacher, "--teacher")
            ordered_teachers(args.teacher)
        except ValueError as exc:
            parser.error(str(exc))
        if args.adaptor is None or args.adaptor_type is None:
            parser.error("--teacher needs --adaptor PATH and --adaptor-type SL|DuL|DLDPO")
    elif args.adaptor is not None or args.adaptor_type is not None:
        parser.error("--adaptor/--adaptor-type only apply with --teacher")
    if args.release_raw_teachers and args.backbone is not None:
        parser.error("--release-raw-teachers applies to adaptors (--teacher or --work-dir), not --backbone")
    if args.work_dir is not None and args.name is not None:
        parser.error("--name applies to --backbone/--teacher; --work-dir names rows after their runs")
    if args.val_targets and args.val_root is None:
        parser.error("--val-targets needs --val-root DIR (the folder holding <NAME>.bin)")


def main(argv: Sequence[str] | None = None) -> list[ResultRow]:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    return run_tool(lambda: _run(args))


def _run(args: argparse.Namespace) -> list[ResultRow]:
    options = dict(allow_resize=args.allow_resize, val_root=args.val_root, val_targets=args.val_targets,
                   max_pixels=args.max_image_pixels)
    settings = StatsSettings(args.bootstrap_resamples, args.bootstrap_seed, args.confidence, tuple(args.fmr_targets),
                             args.fdr_alpha)
    if args.work_dir is not None:
        report = report_work_dir(args.work_dir, args.rfw_root, run_name=args.run_name, out_dir=args.out,
                                 batch_size=args.batch_size, device=args.device,
                                 skip_incomplete=args.skip_incomplete, raw_teachers=args.release_raw_teachers,
                                 settings=settings, **options)
        print(report.text)
        print(f"report {'reused' if report.reused else 'written'}: {report.out_dir}")
        return report.rows
    with output_folder(args.out or Path("eval_results")) as out:  # checked before the evaluation, not after it
        evaluator = RFWEvaluator(args.rfw_root, args.input_size, batch_size=args.batch_size, **options)
        common = dict(embedding_size=args.embedding_size, width=args.width, use_se=args.use_se,
                      device=args.device, name=args.name)
        if args.backbone is not None:
            rows = [evaluate_backbone(args.backbone, args.network, evaluator, **common)]
        else:
            rows = [evaluate_multi_teacher(args.teacher, args.adaptor, args.adaptor_type, evaluator,
                                           teacher_network=args.teacher_network,
                                           raw_teachers=args.release_raw_teachers, **common)]
        paths = write_report(rows, out, settings=settings)
    print(results_table(rows))
    print(f"report written to {out}: {', '.join(p.name for p in paths.values())}")
    return rows


if __name__ == "__main__":
    main()

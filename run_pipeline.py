"""The whole MST-KD paper in one command: split, 8 teachers, extraction, 6 adaptors, 12 students, report.

    python run_pipeline.py                                  # synthetic demo (2 CPU cores, minutes)
    python run_pipeline.py --preset paper data_root=/data/BUPT rfw_root=/data/RFW --nproc-per-node 8
    python run_pipeline.py --from students teacher_set=...  # pick up at a stage
    python run_pipeline.py --seeds 0 1 2                    # one whole run per seed, plus the spread across seeds
    python run_pipeline.py lr=0.05 run_name=lr005           # an ablation beside the first run
    python run_pipeline.py --sweep-shared 0 0.4 0.8         # the demo once per synthetic world, one table

Before anything runs, the plan lists every job with whether it runs and why. A job is skipped only when its
outputs are complete and were made with the same settings (the keys that matter to it) and the same inputs;
a changed key, changed data or RFW files, or a changed upstream output re-runs the job and everything below
it, and the old run is moved aside (``<folder>.replaced-<time>``). An interrupted job resumes. Every stage
runs as its own process. Every ``key=value`` goes to every stage. Torchrun options (--nnodes, --node-rank,
--rdzv-endpoint, ...) after ``--torchrun`` are passed through for multi-node runs.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from utils.core.signals import (
    INTERRUPTED_EXIT_CODE, StopRequest, record_stop_signals, startup_done, stop_on_signals
)

if __name__ == "__main__":
    record_stop_signals()  # before the imports below (seconds): a signal during them ends it with exit 75

from config.config import format_override, load_config, merge_overrides  # noqa: E402
from utils.core.errors import EXIT_CODE, InvalidInputError, UserError  # noqa: E402
from utils.core.locks import folder_lock  # noqa: E402
from utils.core.logs import format_duration  # noqa: E402
from utils.pipeline.launch import (  # noqa: E402
    PipelineInterrupted, StageFailed, report_command, run_command, run_jobs_side_by_side, run_one_by_one
)
from utils.stages.cli import check_networks  # noqa: E402
from utils.pipeline.plan import PRESETS, STAGES, TEACHER_SET_CHOICES, plan, plan_jobs, select_jobs  # noqa: E402
from utils.workdir import artifacts  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="default: demo without data_root=, else paper. " + "; ".join(
                            f"{name}: {preset.description}" for name, preset in PRESETS.items()))
    parser.add_argument("--nproc-per-node", type=int, default=1, help="processes per node for training stages")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="run up to N independent jobs side by side, one process each, the cores split between "
                             "them, output in <output_root>/pipeline_logs/ (for CPU runs of small jobs; on a GPU "
                             "node they share the visible GPUs); default 1: one job at a time in the foreground")
    parser.add_argument("--only", nargs="+", choices=STAGES, help="run only these stages")
    parser.add_argument("--from", dest="start", choices=STAGES, help="start at this stage")
    parser.add_argument("--teacher-sets", choices=TEACHER_SET_CHOICES, default="both",
                        help="which teacher sets to run: specialized, baseline (balanced) or both (default)")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="K",
                        help="run the whole pipeline once per seed into <output_root>/seed<K> and summarise mean and "
                             "spread across seeds (default: one run with the config's seed)")
    parser.add_argument("--plan-only", action="store_true", help="print the plan and stop")
    parser.add_argument("--torchrun", nargs=argparse.REMAINDER, default=[],
                        help="the rest of the line goes to torchrun (multi-node rendezvous options)")
    parser.add_argument("--shared-fraction", type=float, default=None,
                        help="synthetic presets: share of identity directions shared by every ethnicity "
                             "(default: the preset's; see utils/data/synthetic.py)")
    parser.add_argument("--sweep-shared", type=float, nargs="+", metavar="F", default=None,
                        help="synthetic presets: run the pipeline once per shared fraction F, in "
                             "<output root>/shared_<F>, then print the specialized-vs-balanced comparison of each "
                             "(key=value overrides go before this option)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every stage")
    return parser.parse_args(argv)


def prepare_synthetic(sizes: dict[str, float], data_dir: Path, seed: int) -> None:
    """Generate the preset's synthetic data; a complete identical set is reused, another one replaced."""
    from utils.data.synthetic import generate_synthetic

    generate_synthetic(data_dir, seed=seed, overwrite=True, **sizes)


def sweep_shared(args: argparse.Namespace, preset_name: str, root: Path) -> int:
    """The pipeline once per shared fraction (each in its own output root), then one comparison table."""
    from eval.report.sweep import sweep_table
    from eval.report.tables import read_report_rows

    reports = {}
    overrides = [text for text in args.overrides if not text.startswith("output_root=")]
    run_name = _load(overrides).run_name
    for fraction in args.sweep_shared:
        out = root / f"shared_{fraction:g}"
        argv = ["--preset", preset_name, "--shared-fraction", str(fraction), *overrides,
                format_override("output_root", str(out))]
        if args.only:
            argv[:0] = ["--only", *args.only]
        print(f"\n==== shared_fraction={fraction:g}: {out} ====", flush=True)
        run(argv)
        report = artifacts.report_folder(out, run_name)
        reports[fraction] = read_report_rows(report / f"{artifacts.REPORT_STEM}.json")
    print("\nShared-fraction study (students of specialized vs balanced teachers, per synthetic world):\n"
          + sweep_table(reports))
    return 0


def _load(overrides: list[str]):
    try:
        cfg = load_config(merge_overrides(overrides))
    except (KeyError, ValueError) as exc:
        raise InvalidInputError(exc.args[0] if exc.args else str(exc)) from None
    return check_networks(cfg)


def run(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.jobs < 1 or (args.jobs > 1 and args.nproc_per_node > 1):
        raise InvalidInputError(f"--jobs {args.jobs}: give a number >= 1; jobs side by side run one process each, "
                                "so --jobs above 1 goes with --nproc-per-node 1")
    user = _load(args.overrides)
    preset_name = args.preset or ("paper" if user.data_root else "demo")
    preset = PRESETS[preset_name]
    base = [format_override(key, value) for key, value in preset.overrides.items()]
    if preset.synthetic is None and (args.shared_fraction is not None or args.sweep_shared):
        raise InvalidInputError(f"--shared-fraction and --sweep-shared need a synthetic preset (demo, tiny), "
                                f"not {preset_name}")
    if preset.synthetic is not None:
        root = Path(user.output_root)
        if not any(text.startswith("output_root=") for text in args.overrides):
            root = root / preset_name
        if args.sweep_shared:
            return sweep_shared(args, preset_name, root)
        sizes = dict(preset.synthetic)
        if args.shared_fraction is not None:
            sizes["shared_fraction"] = args.shared_fraction
        data_dir = root / "data"
        base = merge_overrides(base, [format_override("output_root", str(root)),
                                      format_override("data_root", str(data_dir / "train")),
                                      format_override("rfw_root", str(data_dir / "rfw"))])
    elif user.data_root is None:
        raise InvalidInputError(f"--preset {preset_name} needs data_root=... (and rfw_root=... for verification)")
    base = merge_overrides(base, args.overrides)
    cfg = _load(base)
    # A second pipeline on the same output_root would rerun the same jobs into the same folders.
    with folder_lock(artifacts.work_root(cfg), what="pipeline output_root"), stop_on_signals() as stop:
        if preset.synthetic is not None:
            prepare_synthetic(sizes, data_dir, user.seed)
        if not args.seeds:
            run_once(args, base, preset_name, stop)
            return 0
        reports = {}
        for seed in dict.fromkeys(args.seeds):
            print(f"==== seed {seed} ====", flush=True)
            seed_root = format_override("output_root", str(artifacts.work_root(cfg) / f"seed{seed}"))
            out_dir = run_once(args, merge_overrides(base, [f"seed={seed}", seed_root]), preset_name, stop)
            if out_dir is not None:
                reports[seed] = out_dir / f"{artifacts.REPORT_STEM}.json"
    if reports:
        from eval.report.seeds import seed_summary

        print("\n" + seed_summary(reports, artifacts.work_root(cfg)))
        print(f"across-seed summary written to {artifacts.work_root(cfg) / 'seeds_summary.md'} (and .json)")
    return 0


def run_once(args: argparse.Namespace, base: list[str], preset_name: str, stop: StopRequest) -> Path | None:
    """Plan and run the selected jobs of one pipeline run, then its report (whose folder is returned)."""
    cfg = _load(base)
    steps = plan(select_jobs(plan_jobs(base, TEACHER_SET_CHOICES[args.teacher_sets]), args.only, args.start))
    run_report = args.only is None or "report" in args.only
    print(f"MST-KD pipeline, preset {preset_name}: {sum(s.run for s in steps)} of {len(steps)} jobs to run"
          f"{' + report' if run_report else ''}, outputs in {cfg.output_root}"
          f"{f' (run_name {cfg.run_name})' if cfg.run_name else ''}", flush=True)
    for number, step in enumerate(steps, 1):
        action = "run" if step.run else "skip"
        print(f"{step.job.line(number, len(steps))} -- {action}: {step.reason}", flush=True)
    if args.plan_only:
        return None
    started = time.perf_counter()
    if args.jobs > 1:
        run_jobs_side_by_side(steps, base, artifacts.work_root(cfg), args.jobs, stop, started)
    else:
        run_one_by_one(steps, base, args.nproc_per_node, args.torchrun, stop, started)
    out_dir = None
    if run_report:
        run_command(report_command(cfg), "report", stop)
        out_dir = artifacts.report_dir(cfg)
    print(f"pipeline finished in {format_duration(time.perf_counter() - started)}", flush=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    startup_done()  # from here a stop signal is recorded: the running stages get it and end resumably
    try:
        return run(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CODE
    except StageFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except PipelineInterrupted as exc:
        print(str(exc), file=sys.stderr)
        return INTERRUPTED_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())

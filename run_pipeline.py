"""The whole MST-KD paper in one command: split, 8 teachers, extraction, 6 adaptors, 12 students, report.

    python run_pipeline.py                                  # synthetic demo (2 CPU cores, minutes)
    python run_pipeline.py --preset paper data_root=/data/BUPT rfw_root=/data/RFW --nproc-per-node 8
    python run_pipeline.py --from students teacher_set=...  # pick up at a stage

Finished jobs are skipped (their outputs say they are complete); an interrupted job resumes from its last epoch.
Every ``key=value`` goes to every stage. Torchrun options (--nnodes, --node-rank, --rdzv-endpoint, ...) after
``--torchrun`` are passed through for multi-node runs.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from config.config import format_override, load_config
from utils.callbacks import format_duration
from utils.locks import FolderLocked, folder_lock
from utils.signals import INTERRUPTED_EXIT_CODE, TrainingInterrupted
from utils.pipeline import PRESETS, STAGES, build_report, plan_jobs, run_job, select_jobs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="default: demo without data_root=, else paper. " + "; ".join(
                            f"{name}: {preset.description}" for name, preset in PRESETS.items()))
    parser.add_argument("--nproc-per-node", type=int, default=1, help="processes per node for training stages")
    parser.add_argument("--only", nargs="+", choices=STAGES, help="run only these stages")
    parser.add_argument("--from", dest="start", choices=STAGES, help="start at this stage")
    parser.add_argument("--torchrun", nargs=argparse.REMAINDER, default=[],
                        help="the rest of the line goes to torchrun (multi-node rendezvous options)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every stage")
    return parser.parse_args(argv)


def prepare_synthetic(sizes: dict[str, int], data_dir: Path, seed: int) -> None:
    """Generate the preset's synthetic data; a complete identical set is reused, another one replaced."""
    from utils.synthetic import generate_synthetic

    generate_synthetic(data_dir, seed=seed, overwrite=True, **sizes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    user = load_config(args.overrides)
    preset_name = args.preset or ("paper" if user.data_root else "demo")
    preset = PRESETS[preset_name]
    base = [format_override(key, value) for key, value in preset.overrides.items()]
    if preset.synthetic is not None:
        root = Path(load_config(base + args.overrides).output_root)
        if not any(text.startswith("output_root=") for text in args.overrides):
            root = root / preset_name
        data_dir = root / "data"
        base += [format_override("output_root", str(root)), format_override("data_root", str(data_dir / "train")),
                 format_override("rfw_root", str(data_dir / "rfw"))]
    elif user.data_root is None:
        raise SystemExit(f"--preset {preset_name} needs data_root=... (and rfw_root=... for verification)")
    base += args.overrides
    cfg = load_config(base)
    # A second pipeline on the same output_root would rerun the same jobs into the same folders.
    try:
        with folder_lock(cfg.work_root, what="pipeline output_root"):
            if preset.synthetic is not None:
                prepare_synthetic(preset.synthetic, cfg.work_root / "data", user.seed)
            return run_jobs(args, base, preset_name)
    except FolderLocked as exc:
        raise SystemExit(f"error: {exc}") from None
    except TrainingInterrupted as exc:
        print(f"interrupted: {exc}; rerun the pipeline to continue", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE


def run_jobs(args: argparse.Namespace, base: list[str], preset_name: str) -> int:
    cfg = load_config(base)
    jobs = select_jobs(plan_jobs(base), args.only, args.start)
    run_report = args.only is None or "report" in args.only
    print(f"MST-KD pipeline, preset {preset_name}: {len(jobs)} jobs + report, outputs in {cfg.output_root}",
          flush=True)
    started = time.perf_counter()
    for number, job in enumerate(jobs, 1):
        header = f"[{number}/{len(jobs)}] {job.stage}: {job.describe()}"
        if job.done():
            print(f"{header} -- complete, skipped", flush=True)
            continue
        print(f"{header} -- running ({format_duration(time.perf_counter() - started)} elapsed)", flush=True)
        run_job(job, base, args.nproc_per_node, args.torchrun)
        if not job.done():
            raise SystemExit(f"{job.describe()} ended without complete outputs (stopped early?)")
    if run_report:
        text, out_dir = build_report(cfg)
        print("\n" + text)
        print(f"\nreport written to {out_dir} (results.md/.csv/.json, results_accuracy.png, results_roc.png)")
    print(f"pipeline finished in {format_duration(time.perf_counter() - started)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

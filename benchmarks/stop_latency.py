"""Stop latency under torchrun: SIGTERM to the torchrun process (as a scheduler sends it) until the run has saved
its checkpoint and every process has exited, with slow steps and a ``log_every`` far above the run's length.

    python benchmarks/stop_latency.py [--step-seconds 2] [--log-every 50] [--nproc 2] [--repeats 3]

Runs the training loop through ``tests/stop_one_rank.py`` (a tiny regression task whose steps sleep
``--step-seconds``; gloo on the CPU) and signals each repeat at another point of a step. torchrun passes SIGTERM on
to its workers and kills them 30 s later; the ranks agree to stop at most ``LAG_STEPS + 1`` steps after the signal
(``utils/train/stopping.py``). Prints one line per repeat and writes benchmarks/results/stop_latency.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.train.stopping import LAG_STEPS  # noqa: E402
from utils.workdir import artifacts  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "stop_latency.json"
WORKER = ROOT / "tests" / "stop_one_rank.py"


def wait_until(condition, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the worker did not get there in time")
        time.sleep(0.01)


def stopped(run_dir: Path) -> bool:
    path = artifacts.history_file(run_dir)
    try:
        return "stopped" in json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def one_stop(run_dir: Path, args: argparse.Namespace, delay: float) -> dict[str, float]:
    """Start a run, SIGTERM torchrun ``delay`` seconds after the first step began, time the save and the exit."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               str(WORKER), str(run_dir), "--step-seconds", str(args.step_seconds), "--epochs", "1000",
               f"log_every={args.log_every}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    log = artifacts.log_file(run_dir)
    with open(run_dir.parent / f"{run_dir.name}.out", "w") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        wait_until(lambda: log.is_file() and "config:" in log.read_text())
        time.sleep(delay)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        wait_until(lambda: stopped(run_dir), timeout=60)
        saved = time.monotonic() - signalled
        code = process.wait(timeout=60)
        return {"delay_s": delay, "saved_s": saved, "exited_s": time.monotonic() - signalled, "torchrun_exit": code}
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step-seconds", type=float, default=2.0)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            # Signals land at different points of a step: 0, 1/3, 2/3 of a step after the same step boundary.
            delay = args.step_seconds * (3 + repeat / args.repeats)
            run = one_stop(Path(tmp) / f"run{repeat}", args, delay)
            runs.append(run)
            print(f"SIGTERM {delay:.1f} s into training: checkpoint and history saved after {run['saved_s']:.1f} s, "
                  f"all processes exited after {run['exited_s']:.1f} s (torchrun exit {run['torchrun_exit']})",
                  flush=True)
    worst = max(run["exited_s"] for run in runs)
    print(f"stop latency, torchrun {args.nproc} ranks (gloo), {args.step_seconds:g} s steps, log_every="
          f"{args.log_every}, LAG_STEPS={LAG_STEPS}: at most {worst:.1f} s from SIGTERM to every process gone")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.node(), "step_seconds": args.step_seconds,
                                    "log_every": args.log_every, "nproc": args.nproc, "lag_steps": LAG_STEPS,
                                    "runs": runs, "worst_exit_s": worst}, indent=2))


if __name__ == "__main__":
    main()

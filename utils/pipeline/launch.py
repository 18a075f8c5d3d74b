"""Running the planned jobs: each as its own process (python, or torchrun with several processes per node) with
``resume=True`` (an interrupted run with the same record continues) and ``replace=True`` (a run of other
settings or inputs is moved aside), one after another or side by side, stopped together on a signal."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from config.config import MAX_IMAGE_PIXELS, Config, merge_overrides
from utils.core.errors import InvalidInputError
from utils.core.signals import StopRequest
from utils.pipeline.plan import REPO, Job, Step
from utils.workdir import artifacts

# The pipeline continues interrupted runs and moves runs of other settings or inputs aside (the plan says so).
JOB_FLAGS = ("resume=True", "replace=True")


def launch_command(job: Job, base: Sequence[str], nproc: int, torchrun_args: Sequence[str]) -> list[str]:
    """The command line of a job: plain python, or torchrun when several processes are asked for."""
    script = str(REPO / job.script)
    args = merge_overrides(base, job.overrides, JOB_FLAGS)
    if nproc > 1 and job.distributed:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", *torchrun_args]
        if not any(arg.startswith(("--rdzv", "--nnodes", "--master")) for arg in torchrun_args):
            launcher.append("--standalone")
        return [*launcher, script, *args]
    return [sys.executable, script, *args]


class StageFailed(Exception):
    """A stage's process ended with a non-zero exit code; it printed its own error."""

    def __init__(self, what: str, returncode: int) -> None:
        super().__init__(f"{what} failed with exit code {returncode} (its output is above)")
        self.returncode = returncode

    @property
    def exit_code(self) -> int:
        """The pipeline's exit code: the stage's, or 128 + n when signal n killed it (as a shell reports it)."""
        return self.returncode if self.returncode > 0 else 128 - self.returncode


class PipelineInterrupted(Exception):
    """SIGTERM/SIGINT reached the pipeline and its running jobs, which saved resumable checkpoints."""


def run_command(command: Sequence[str], what: str, stop: StopRequest) -> None:
    """Run one stage as its own process in the foreground; a failure stops the pipeline.

    A stop signal the pipeline gets is passed on to the stage, which saves and ends resumably, and then ends the
    pipeline: a scheduler that signals only the pipeline's pid loses no work.
    """
    if stop.signal is not None:
        raise PipelineInterrupted(f"{stop.name}: pipeline stopped before {what}; run the same command to continue")
    print("$ " + shlex.join(command), flush=True)
    process = subprocess.Popen(list(command), cwd=REPO)
    passed_on = False
    while process.poll() is None:
        if stop.signal is not None and not passed_on:
            # Always SIGTERM: a Ctrl-C at a terminal reaches the stage itself too, and a second SIGINT would
            # stop it at once, without its checkpoint.
            process.send_signal(signal.SIGTERM)
            passed_on = True
        time.sleep(0.05)
    if stop.signal is not None:
        raise PipelineInterrupted(f"{stop.name}: pipeline stopped; {what} ended with exit code {process.returncode} "
                                  "(75: saved to resume); run the same command to continue")
    if process.returncode != 0:
        raise StageFailed(what, process.returncode)


def run_one_by_one(steps: Sequence[Step], base: Sequence[str], nproc: int, torchrun_args: Sequence[str],
                   stop: StopRequest, started: float) -> None:
    """Run the steps that must run in order, each in the foreground (its output is the pipeline's)."""
    for number, step in enumerate(steps, 1):
        if not step.run:
            continue
        print(f"{step.job.line(number, len(steps))} -- running ({time.perf_counter() - started:.0f} s elapsed)",
              flush=True)
        run_command(launch_command(step.job, base, nproc, torchrun_args), step.job.describe(), stop)
        verdict = step.job.check()
        if not verdict.done:
            raise InvalidInputError(f"{step.job.describe()} ended without complete outputs ({verdict.reason}; "
                                    "stopped early?)")


def _job_failure(step: Step, returncode: int, log: Path) -> Exception | None:
    """Why a finished side-by-side job failed (its log's tail printed), or None when its outputs are complete."""
    if returncode != 0:
        print(log.read_text()[-4000:], file=sys.stderr)
        return StageFailed(f"{step.job.describe()} (log {log})", returncode)
    verdict = step.job.check()
    if not verdict.done:
        return InvalidInputError(f"{step.job.describe()} ended without complete outputs ({verdict.reason}; log {log})")
    return None


def run_jobs_side_by_side(steps: Sequence[Step], base: Sequence[str], work_dir: Path, workers: int,
                          stop: StopRequest, started: float) -> None:
    """Run the steps that must run, up to ``workers`` at a time, each once every job it reads from has finished.

    Each job writes its output to its own log (``artifacts.job_log_file``), shown when it fails. A failure or a
    stop signal lets no new job start and asks the running ones to save a resumable checkpoint (SIGTERM).
    """
    pending = [step for step in steps if step.run]
    to_run = {step.job.key for step in pending}
    number = {step.job.key: index for index, step in enumerate(steps, 1)}
    finished: set[str] = set()
    running: dict[str, tuple[Step, subprocess.Popen, Path]] = {}
    failure: Exception | None = None
    stopping = False
    # Jobs side by side share the cores instead of each taking all of them (unless the user chose a number).
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // workers)), **os.environ}

    def stop_running() -> None:
        for _, process, _ in running.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    while pending or running:
        if failure is None and stop.signal is None:
            for step in [s for s in pending if all(k in finished or k not in to_run for k in s.job.upstream)]:
                if len(running) >= workers:
                    break
                log = artifacts.job_log_file(work_dir, step.job.key)
                log.parent.mkdir(parents=True, exist_ok=True)
                with open(log, "w") as handle:
                    process = subprocess.Popen(launch_command(step.job, base, 1, []), cwd=REPO, env=env,
                                               stdout=handle, stderr=subprocess.STDOUT)
                running[step.job.key] = (step, process, log)
                pending.remove(step)
                print(f"{step.job.line(number[step.job.key], len(steps))} -- running "
                      f"({time.perf_counter() - started:.0f} s elapsed; output in {log})", flush=True)
        elif not stopping:
            stopping = True
            pending.clear()
            stop_running()
        time.sleep(0.1)
        for key, (step, process, log) in list(running.items()):
            if process.poll() is None:
                continue
            del running[key]
            if stop.signal is not None or failure is not None:
                continue
            failure = _job_failure(step, process.returncode, log)
            if failure is not None:
                continue
            finished.add(key)
            print(f"{step.job.line(number[key], len(steps))} -- done", flush=True)
    if stop.signal is not None:
        raise PipelineInterrupted(f"{stop.name}: pipeline stopped; the running jobs saved resumable checkpoints; run "
                              "the same command to continue")
    if failure is not None:
        raise failure


def report_command(cfg: Config) -> list[str]:
    """The report of the runs of this config's run_name: ``python -m eval.evaluate --work-dir ...``, with the
    config's bootstrap and operating-point settings."""
    if cfg.rfw_root is None:
        raise InvalidInputError("the report needs rfw_root=<folder with <Ethnicity>_test.bin>")
    command = [sys.executable, "-m", "eval.evaluate", "--work-dir", str(artifacts.work_root(cfg)), "--rfw-root",
               str(cfg.rfw_root), "--run-name", cfg.run_name, "--batch-size", str(cfg.extract_batch_size),
               "--bootstrap-resamples", str(cfg.bootstrap_resamples), "--bootstrap-seed", str(cfg.bootstrap_seed),
               "--confidence", str(cfg.confidence), "--fdr-alpha", str(cfg.fdr_alpha),
               "--fmr-targets", *map(str, cfg.fmr_targets)]
    if cfg.val_targets:
        command += ["--val-root", str(cfg.val_root), "--val-targets", *cfg.val_targets]
    if cfg.max_image_pixels != MAX_IMAGE_PIXELS:
        command += ["--max-image-pixels", str(cfg.max_image_pixels)]
    return command + (["--allow-resize"] if cfg.allow_resize else [])

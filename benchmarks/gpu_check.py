"""GPU readiness check: does this node train, resume and run fast enough, in every precision?

    python benchmarks/gpu_check.py [--preset full|quick|ci] [--out DIR] [--work DIR] [options]
    make gpu-check                     # the full check on every GPU of the node
    make gpu-check ARGS="--preset quick --out /tmp/gpu_check"

1. Writes synthetic face data (utils.data.synthetic) at ``--image-size`` (112 px by default).
2. For each precision (fp32, bf16, fp16) trains an African teacher (train.py) under torchrun (NCCL on GPUs,
   gloo on CPU) for two epochs, split over two launches: the second resumes from checkpoint_last.pt.
   Checks: finite losses, epoch 2's loss below epoch 1's, the resume continued the run (and, for fp16,
   the scaler state was checkpointed).
3. Measures, on one device: training samples/s per GPU through the engine (train.log, warm-up windows left
   out) vs a bare forward/backward/SGD loop on the same model, head and precision with data already on the
   device; data-loader images/s per worker (JPEG decode and resize, as in training); extraction images/s
   (utils.stages.extract.extract_teacher with the fp32 teacher over every image).
4. Prints a table and writes ``gpu_check.json``, ``gpu_check.txt`` and each run's ``<precision>_train.log``
   to ``--out``; exits 1 when a check fails.

Presets: ``full`` (iresnet50, 500 ids x 32 images per ethnicity, batch 128), ``quick`` (iresnet50, 200 x 32,
batch 128: a few minutes on one GPU), ``ci`` (iresnet18 of width 8 at 32 px, two CPU ranks: seconds). Any
option given explicitly overrides the preset. Only the project, torch, numpy and opencv are needed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from backbones import build_backbone  # noqa: E402
from config.config import load_config  # noqa: E402
from utils.core.distributed import DistInfo  # noqa: E402
from utils.data.synthetic import generate_synthetic  # noqa: E402
from utils.stages.common import make_header  # noqa: E402
from utils.stages.extract import (  # noqa: E402
    check_index_images, extract_teacher, plan_extraction, prepare_index, teacher_checkpoint)
from utils.workdir import artifacts  # noqa: E402
from utils.workdir.inputs import build_training_dataset  # noqa: E402

PRECISIONS = ("fp32", "bf16", "fp16")
AMP = {"fp32": "none", "bf16": "bf16", "fp16": "fp16"}
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
ETHNICITY = "African"
PRESETS: dict[str, dict[str, Any]] = {
    "full": {"network": "iresnet50", "width": 64, "image_size": 112, "embedding_size": 512, "ids": 500,
             "images_per_id": 32, "batch": 128, "epochs": 2, "workers": 8, "bench_steps": 50,
             "amp_init_scale": None, "nproc": None},
    "quick": {"network": "iresnet50", "width": 64, "image_size": 112, "embedding_size": 512, "ids": 200,
              "images_per_id": 32, "batch": 128, "epochs": 2, "workers": 8, "bench_steps": 30,
              "amp_init_scale": None, "nproc": None},
    # The tiny net's margin gradients overflow fp16 at PyTorch's first scale of 2**16 within 3-step epochs.
    "ci": {"network": "iresnet18", "width": 8, "image_size": 32, "embedding_size": 64, "ids": 6,
           "images_per_id": 8, "batch": 8, "epochs": 2, "workers": 1, "bench_steps": 2,
           "amp_init_scale": 256.0, "nproc": 2},
}
SPEED = re.compile(r" ([\d.]+) samples/s ")


def _device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(nproc: int) -> dict[str, Any]:
    env: dict[str, Any] = {"torch": torch.__version__, "python": sys.version.split()[0], "world_size": nproc}
    if torch.cuda.is_available():
        env.update(cuda=torch.version.cuda, gpus=[torch.cuda.get_device_name(i) for i in range(nproc)],
                   cudnn=torch.backends.cudnn.version(), bf16_supported=torch.cuda.is_bf16_supported(),
                   nccl=".".join(map(str, torch.cuda.nccl.version())) if isinstance(
                       torch.cuda.nccl.version(), tuple) else str(torch.cuda.nccl.version()), backend="nccl",
                   tf32={"conv": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32})
    else:
        env.update(gpus=[], backend="gloo", cpu_threads=torch.get_num_threads())
    return env


def nccl_smoke_test(work: Path) -> str:
    """A one-rank NCCL group and all-reduce: the library loads and talks to the GPU (several ranks need
    several GPUs, which the training runs then use)."""
    store = work / "nccl_store"
    store.unlink(missing_ok=True)
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    try:
        tensor = torch.ones(4, device="cuda")
        dist.all_reduce(tensor)
        torch.cuda.synchronize()
        return "ok" if torch.equal(tensor.cpu(), torch.ones(4)) else f"wrong all-reduce result {tensor.tolist()}"
    finally:
        dist.destroy_process_group()


def overrides(args: argparse.Namespace, data: Path, output_root: Path, precision: str) -> list[str]:
    steps = args.ids * args.images_per_id // (args.batch * args.nproc)
    values: dict[str, Any] = {
        "data_root": str(data / "train"), "output_root": str(output_root), "ethnicity": ETHNICITY,
        "network": args.network, "width": args.width, "input_size": args.image_size,
        "embedding_size": args.embedding_size, "batch_size": args.batch, "num_epoch": args.epochs,
        "milestones": [], "num_workers": args.workers, "log_every": max(1, steps // 4), "amp": AMP[precision],
    }
    if precision == "fp16" and args.amp_init_scale is not None:
        values["amp_init_scale"] = float(args.amp_init_scale)
    return [f"{key}={value!r}" for key, value in values.items()]


def torchrun(args: argparse.Namespace, script: str, run_args: list[str], log: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if not torch.cuda.is_available():
        env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               str(ROOT / script), *run_args]
    with open(log, "a") as handle:
        completed = subprocess.run(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if completed.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(command[3:6])} {script} failed (exit {completed.returncode}); "
                           f"output in {log}:\n{tail}")


def engine_speed(log_text: str, world_size: int) -> float | None:
    """Median samples/s per GPU of the windows in a train.log's text, leaving out each launch's first (warm-up)
    window."""
    speeds: list[float] = []
    for launch in log_text.split(" run in ")[1:]:
        speeds.extend(float(match) for match in SPEED.findall(launch)[1:])
    return statistics.median(speeds) / world_size if speeds else None


def train_precision(args: argparse.Namespace, data: Path, precision: str) -> dict[str, Any]:
    output_root = args.work / "runs" / precision
    shutil.rmtree(output_root, ignore_errors=True)
    run_args = overrides(args, data, output_root, precision)
    console = args.work / f"{precision}_console.log"
    console.unlink(missing_ok=True)
    start = time.perf_counter()
    torchrun(args, "train.py", run_args + ["stop_after_epoch=1"], console)
    torchrun(args, "train.py", run_args + ["resume=True"], console)
    seconds = time.perf_counter() - start
    run_dir = artifacts.teacher_dir(load_config(run_args))
    history = json.loads(artifacts.history_file(run_dir).read_text())
    losses = [epoch["losses"]["loss"] for epoch in history["epochs"]]
    train_log = artifacts.log_file(run_dir)
    log_text = train_log.read_text()
    checks = {
        "finite": all(math.isfinite(loss) for loss in losses),
        "loss_falls": len(losses) >= 2 and losses[-1] < losses[0],
        "resumed": history["complete"] and len(losses) == args.epochs and "resumed from" in log_text,
        "precision_logged": f"precision {precision}" in log_text,
    }
    if precision == "fp16":
        checkpoint = torch.load(artifacts.checkpoint_file(run_dir), map_location="cpu", weights_only=True)
        checks["scaler_saved"] = bool(checkpoint["scaler"]) and checkpoint["scaler"]["scale"] > 0
    shutil.copyfile(train_log, args.out / f"{precision}_train.log")
    return {"losses": losses, "checks": checks, "ok": all(checks.values()), "wall_seconds": seconds,
            "skipped_steps": [epoch.get("skipped_steps") for epoch in history["epochs"]],
            "engine_samples_per_s_per_gpu": engine_speed(log_text, args.nproc),
            "run_dir": str(run_dir)}


def bare_speed(args: argparse.Namespace, data: Path, precision: str, num_classes: int) -> float:
    """samples/s of forward, margin head, cross-entropy, backward and SGD on one device, data already there."""
    device = _device()
    cfg = load_config(overrides(args, data, args.work / "bare", precision))
    torch.manual_seed(0)
    model, header = build_backbone(cfg).to(device).train(), make_header(cfg, num_classes).to(device).train()
    optimizer = torch.optim.SGD([*model.parameters(), *header.parameters()], lr=cfg.scaled_lr, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, init_scale=cfg.amp_init_scale, enabled=precision == "fp16")
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, num_classes, (args.batch,), device=device)
    dtype = AUTOCAST[precision]

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = nn.functional.cross_entropy(header(model(images), labels).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(3):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.bench_steps):
        step()
    _sync(device)
    return args.batch * args.bench_steps / (time.perf_counter() - start)


def loader_speed(args: argparse.Namespace, data: Path) -> dict[str, float]:
    cfg = load_config(overrides(args, data, args.work / "loader", "fp32"))
    dataset, _ = build_training_dataset(cfg, "ethnicity")
    loader = DataLoader(dataset, batch_size=args.batch, shuffle=True, drop_last=True, num_workers=args.workers)
    count, start = 0, None
    for images, *_ in loader:
        if start is None:  # the first batch pays for the workers' start
            start = time.perf_counter()
            continue
        count += len(images)
    seconds = time.perf_counter() - start if start is not None else 0.0
    total = count / seconds if seconds > 0 else float("nan")
    return {"workers": args.workers, "images_per_s": total, "images_per_s_per_worker": total / max(1, args.workers)}


def extraction_speed(args: argparse.Namespace, data: Path, precision: str) -> dict[str, float]:
    cfg = load_config(overrides(args, data, args.work / "runs" / precision, precision))
    info = DistInfo(0, 0, 1, _device())
    index = prepare_index(cfg, info)
    # As extract_all.py before writing a store; it also leaves the images in the page cache for the timed pass.
    check_index_images(cfg, index, info)
    checkpoint = teacher_checkpoint(cfg, ETHNICITY)
    _sync(info.device)
    start = time.perf_counter()
    (plan,) = plan_extraction(cfg, {ETHNICITY: checkpoint}, index, info)
    extract_teacher(cfg, plan, index, info)
    _sync(info.device)
    seconds = time.perf_counter() - start
    return {"images": len(index), "images_per_s": len(index) / seconds, "teacher": precision,
            "batch": cfg.extract_batch_size}


def table(result: dict[str, Any]) -> str:
    env, setup = result["environment"], result["setup"]
    device = ", ".join(env["gpus"]) if env["gpus"] else f"CPU ({env.get('cpu_threads')} threads)"
    lines = [f"GPU check: {device}; torch {env['torch']}, CUDA {env.get('cuda') or '-'}, {env['backend']} x "
             f"{env['world_size']} ranks" + (f", NCCL {env['nccl']} ({result['nccl']})" if env.get("nccl") else ""),
             f"{setup['network']} {setup['image_size']}x{setup['image_size']}, batch {setup['batch']} per rank, "
             f"{setup['epochs']} epochs of {setup['steps_per_epoch']} steps, {setup['images']} images per epoch",
             "",
             f"{'precision':<9} {'loss epoch 1 -> last':<22} {'falls':<5} {'resumed':<7} {'skipped':<9} "
             f"{'engine/GPU':>10} {'bare/GPU':>10} {'ratio':>6}  (samples/s)"]
    for precision, run in result["runs"].items():
        checks, losses = run["checks"], run["losses"]
        engine, bare = run["engine_samples_per_s_per_gpu"], run["bare_samples_per_s_per_gpu"]
        skipped = "-" if precision != "fp16" else "+".join(str(s) for s in run["skipped_steps"])
        ratio = f"{engine / bare:.2f}" if engine and bare else "-"
        lines.append(f"{precision:<9} {losses[0]:>8.3f} -> {losses[-1]:<10.3f} "
                     f"{'yes' if checks['loss_falls'] else 'NO':<5} {'yes' if checks['resumed'] else 'NO':<7} "
                     f"{skipped:<9} {engine or float('nan'):>10.1f} {bare:>10.1f} {ratio:>6}")
    loader, extraction = result["loader"], result["extraction"]
    lines += ["",
              f"data loader: {loader['workers']} workers, {loader['images_per_s']:.0f} images/s, "
              f"{loader['images_per_s_per_worker']:.0f} images/s per worker",
              f"extraction: {extraction['images']} images, {extraction['images_per_s']:.0f} images/s on one device "
              f"({extraction['teacher']} teacher, batch {extraction['batch']})",
              f"result: {'PASS' if result['ok'] else 'FAIL: ' + ', '.join(result['failures'])}"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=tuple(PRESETS), default="full")
    parser.add_argument("--quick", action="store_const", const="quick", dest="preset", help="= --preset quick")
    parser.add_argument("--out", type=Path, default=ROOT / "work_dirs" / "gpu_check", help="results folder")
    parser.add_argument("--work", type=Path, help="data and runs (default: <out>/work)")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--network")
    parser.add_argument("--width", type=int)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--embedding-size", type=int)
    parser.add_argument("--ids", type=int, help="identities per ethnicity (the teacher trains on one ethnicity)")
    parser.add_argument("--images-per-id", type=int)
    parser.add_argument("--batch", type=int, help="per rank")
    parser.add_argument("--epochs", type=int, help="at least 2: the last one runs in a resumed launch")
    parser.add_argument("--workers", type=int, help="data-loader workers per rank")
    parser.add_argument("--bench-steps", type=int, help="timed steps of the bare loop")
    parser.add_argument("--amp-init-scale", type=float, help="fp16 GradScaler's first scale (config default if unset)")
    parser.add_argument("--nproc", type=int, help="ranks (default: every GPU, or 2 CPU ranks)")
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.nproc is None:
        args.nproc = torch.cuda.device_count() if torch.cuda.is_available() else 2
    if torch.cuda.is_available() and not 1 <= args.nproc <= torch.cuda.device_count():
        parser.error(f"--nproc {args.nproc}: this node has {torch.cuda.device_count()} GPUs (one rank per GPU)")
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (loss falls, and the last epoch resumes)")
    args.work = args.work or args.out / "work"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    data = args.work / "data"
    start = time.perf_counter()
    generate_synthetic(data, ids_per_ethnicity=args.ids, images_per_id=args.images_per_id, pairs_per_ethnicity=10,
                       image_size=args.image_size, overwrite=True)
    images = args.ids * args.images_per_id
    result: dict[str, Any] = {
        "environment": environment(args.nproc),
        "setup": {"preset": args.preset, "network": args.network, "width": args.width, "image_size": args.image_size,
                  "batch": args.batch, "epochs": args.epochs, "images": images, "workers": args.workers,
                  "steps_per_epoch": images // (args.batch * args.nproc), "precisions": args.precisions},
        "data_seconds": time.perf_counter() - start,
    }
    print(f"gpu_check: data ready in {result['data_seconds']:.0f} s; training {', '.join(args.precisions)}", flush=True)
    if torch.cuda.is_available():
        result["nccl"] = nccl_smoke_test(args.work)
    runs: dict[str, Any] = {}
    for precision in args.precisions:
        runs[precision] = train_precision(args, data, precision)
        runs[precision]["bare_samples_per_s_per_gpu"] = bare_speed(args, data, precision, args.ids)
        print(f"gpu_check: {precision} {'ok' if runs[precision]['ok'] else 'FAILED'} "
              f"({runs[precision]['wall_seconds']:.0f} s)", flush=True)
    result["runs"] = runs
    result["loader"] = loader_speed(args, data)
    result["extraction"] = extraction_speed(args, data, "fp32" if "fp32" in runs else args.precisions[0])
    failures = [f"{precision}: {name}" for precision, run in runs.items()
                for name, ok in run["checks"].items() if not ok]
    if result.get("nccl", "ok") != "ok":
        failures.append(f"nccl: {result['nccl']}")
    result["ok"], result["failures"] = not failures, failures
    result["seconds"] = time.perf_counter() - start
    text = table(result)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "gpu_check.txt").write_text(text + "\n")
    print(text, flush=True)
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)

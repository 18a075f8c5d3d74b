"""GPU readiness and throughput check: does this node train, resume and run at the hardware's rate, in every precision?

    python benchmarks/gpu_check.py [--preset full|quick|ci] [--out DIR] [--work DIR] [options]
    make gpu-check                                          # the full check on every GPU of the node
    make gpu-check ARGS="--preset quick --out /tmp/gpu_check" # one GPU, within 6 minutes, data included

1. Writes synthetic face data (utils.data.synthetic) at ``--image-size`` (112 px by default).
2. For each precision (fp32, bf16, fp16) trains an African teacher (train.py) under torchrun for ``--epochs``
   epochs, split over two launches: the second resumes from checkpoint_last.pt. Checks: finite losses, the last
   epoch's loss below the first's, the resume continued the run (and, for fp16, the scaler state was saved). The
   engine's samples/s per GPU is the median over the resumed launch's epochs after its first (warm-up).
3. The same work as a bare loop on one device, data already there: the same network, margin head, batch, fused or
   foreach SGD with momentum and weight decay, clipping, autocast and GradScaler, channels_last; timed after
   warm-up, synchronised, the median of ``--rounds`` rounds.
4. Host synchronisations per step and the GPU's busy fraction, counted with torch.profiler over steady-state steps
   of the engine (in this process) and of the bare loop: cudaStreamSynchronize / cudaDeviceSynchronize /
   cudaEventSynchronize calls and device-to-host copies.
5. Extraction images/s (utils.stages.extract.extract_teacher over every image, JPEG decoding included) and the
   device-only embedding rate (uint8 batches through utils.data.inference at ``--extract-batch``).
6. With ``--compile`` (the ``full`` preset's default): the bare loop again with the backbone under torch.compile,
   in bf16 (else the first precision): its samples/s against the eager loop's and the seconds its first step took
   to compile; the config key ``compile`` should become the default only where this wins.
7. Achieved TFLOP/s (forward+backward FLOPs per sample counted with torch.utils.flop_counter; about 38 GFLOP for
   iresnet50 at 112 px) and the paper's estimated total time on one 8-GPU node from the measured rates (8 teachers x
   0.32 M images x 52 epochs, 12 students x 1.25 M x 52, 6 adaptors x 1.25 M x 26, 8 extractions of 1.25 M).

Writes ``gpu_check.json`` after every section (a time-out still leaves the figures so far), then ``gpu_check.txt``
and each run's ``<precision>_train.log`` to ``--out``; exits 1 when a check fails.

Presets: ``full`` (iresnet50, 500 ids x 32 images per ethnicity, batch 128), ``quick`` (iresnet50, 160 x 32,
batch 128: within 6 minutes on one GPU, data generation included), ``ci`` (iresnet18 of width 8 at 32 px on the
CPU: a dry run of every section in seconds). Any option given explicitly overrides the preset. Only the project,
torch, numpy and opencv are needed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from backbones import build_backbone  # noqa: E402
from config.config import Config, load_config  # noqa: E402
from utils.core.distributed import DistInfo  # noqa: E402
from utils.core.precision import Precision, configure_cuda  # noqa: E402
from utils.data.inference import Inference  # noqa: E402
from utils.data.synthetic import generate_synthetic  # noqa: E402
from utils.stages.common import classification_loss, make_header, train_options  # noqa: E402
from utils.stages.extract import (  # noqa: E402
    check_index_images, extract_teacher, plan_extraction, prepare_index, teacher_checkpoint)
from utils.stages.teacher import build_teacher_task  # noqa: E402
from utils.train.loop import train  # noqa: E402
from utils.train.optim import build_sgd  # noqa: E402
from utils.train.task import Batch  # noqa: E402
from utils.workdir import artifacts  # noqa: E402
from utils.workdir.inputs import build_training_dataset  # noqa: E402

PRECISIONS = ("fp32", "bf16", "fp16")
AMP = {"fp32": "none", "bf16": "bf16", "fp16": "fp16"}
ETHNICITY = "African"
PRESETS: dict[str, dict[str, Any]] = {
    "full": {"network": "iresnet50", "width": 64, "image_size": 112, "embedding_size": 512, "ids": 500,
             "images_per_id": 32, "batch": 128, "epochs": 5, "workers": 8, "bench_steps": 50, "rounds": 5,
             "extract_batch": 1024, "adaptor_classes": 27997, "amp_init_scale": None, "nproc": None, "compile": True},
    "quick": {"network": "iresnet50", "width": 64, "image_size": 112, "embedding_size": 512, "ids": 160,
              "images_per_id": 32, "batch": 128, "epochs": 5, "workers": 8, "bench_steps": 20, "rounds": 3,
              "extract_batch": 1024, "adaptor_classes": 27997, "amp_init_scale": None, "nproc": 1, "compile": False},
    # The tiny net's margin gradients overflow fp16 at PyTorch's first scale of 2**16 within 3-step epochs.
    "ci": {"network": "iresnet18", "width": 8, "image_size": 32, "embedding_size": 64, "ids": 6,
           "images_per_id": 8, "batch": 8, "epochs": 4, "workers": 1, "bench_steps": 2, "rounds": 3,
           "extract_batch": 64, "adaptor_classes": 500, "amp_init_scale": 256.0, "nproc": 2, "compile": False},
}
# The paper's work (DESIGN.md): samples per stage kind on one node.
PAPER = {"teacher_samples": 8 * 0.32e6 * 52, "student_samples": 12 * 1.25e6 * 52,
         "adaptor_samples": 6 * 1.25e6 * 26, "extraction_images": 8 * 1.25e6, "gpus": 8}
ADAPTOR_INPUT = 2048  # four 512-D teachers
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
PROFILED_STEPS = 5


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
    values: dict[str, Any] = {
        "data_root": str(data / "train"), "output_root": str(output_root), "ethnicity": ETHNICITY,
        "network": args.network, "width": args.width, "input_size": args.image_size,
        "embedding_size": args.embedding_size, "batch_size": args.batch, "num_epoch": args.epochs,
        "milestones": [], "num_workers": args.workers, "amp": AMP[precision], "extract_batch_size": args.extract_batch,
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


def median_rate(samples: float, seconds: list[float]) -> float:
    return samples / statistics.median(seconds)


def train_precision(args: argparse.Namespace, data: Path, precision: str) -> dict[str, Any]:
    """Train and resume under torchrun; the engine's rate is the median of the resumed launch's later epochs."""
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
    log_text = artifacts.log_file(run_dir).read_text()
    checks = {
        "finite": all(math.isfinite(loss) for loss in losses),
        "loss_falls": len(losses) >= 2 and losses[-1] < losses[0],
        "resumed": history["complete"] and len(losses) == args.epochs and "resumed from" in log_text,
        "precision_logged": f"precision {precision}" in log_text,
    }
    if precision == "fp16":
        checkpoint = torch.load(artifacts.checkpoint_file(run_dir), map_location="cpu", weights_only=True)
        checks["scaler_saved"] = bool(checkpoint["scaler"]) and checkpoint["scaler"]["scale"] > 0
    shutil.copyfile(artifacts.log_file(run_dir), args.out / f"{precision}_train.log")
    steps = history["epochs"][0]["global_step"]
    timed = [epoch["seconds"] for epoch in history["epochs"][2:]]  # epoch 2 warms the resumed launch up
    return {"losses": losses, "checks": checks, "ok": all(checks.values()), "wall_seconds": seconds,
            "skipped_steps": [epoch.get("skipped_steps") for epoch in history["epochs"]],
            "engine_samples_per_s_per_gpu": median_rate(steps * args.batch, timed), "engine_epoch_seconds": timed,
            "run_dir": str(run_dir)}


def bench_config(args: argparse.Namespace, data: Path, precision: str, name: str) -> Config:
    return load_config(overrides(args, data, args.work / name / precision, precision))


def optimise(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
             clipped: Iterable[nn.Parameter], grad_clip: float) -> None:
    """The engine's update for the bare loops: scaled backward, unscale, clip, scaler step."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    nn.utils.clip_grad_norm_(clipped, grad_clip)
    scaler.step(optimizer)
    scaler.update()


def bare_step(cfg: Config, num_classes: int, batch: int) -> Callable[[], None]:
    """One training step of the engine's work with the data already on the device: forward, margin head,
    cross-entropy, backward, clipping, SGD with momentum and weight decay, in the run's precision."""
    device = _device()
    options = train_options(cfg)
    configure_cuda(device, options.cudnn_benchmark)
    channels_last = options.channels_last and device.type == "cuda"
    torch.manual_seed(0)
    model, header = build_backbone(cfg).to(device).train(), make_header(cfg, num_classes).to(device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_sgd([{"params": list(model.parameters())}, {"params": list(header.parameters())}],
                          lr=cfg.scaled_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, device=device)
    precision = Precision(cfg.amp, device)
    scaler = precision.grad_scaler(cfg.amp_init_scale)
    images = torch.rand(batch, 3, cfg.input_size, cfg.input_size, device=device) * 2 - 1
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (batch,), device=device)
    trained = torch.compile(model) if options.compile else model
    data = Batch(images, labels, torch.arange(batch, device=device), torch.zeros(batch, dtype=torch.bool,
                                                                                  device=device))

    def step() -> None:
        with precision.autocast():
            loss = classification_loss(trained, header, data)["loss"]
        optimise(loss, optimizer, scaler, model.parameters(), cfg.grad_clip)

    return step


def timed_rounds(step: Callable[[], None], steps: int, rounds: int) -> list[float]:
    """Seconds of ``rounds`` rounds of ``steps`` steps, after three warm-up steps, each round synchronised."""
    device = _device()
    for _ in range(3):
        step()
    _sync(device)
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def compile_speed(args: argparse.Namespace, data: Path, precision: str, eager_rate: float) -> dict[str, Any]:
    """The bare loop with its backbone under torch.compile (the engine's ``compile=True``) against ``eager_rate``,
    the same loop's eager samples/s; the first step's seconds are the compilation's."""
    cfg = load_config(overrides(args, data, args.work / "compile" / precision, precision) + ["compile=True"])
    step = bare_step(cfg, args.ids, args.batch)
    start = time.perf_counter()
    step()
    _sync(_device())
    compile_seconds = time.perf_counter() - start
    rate = median_rate(args.batch * args.bench_steps, timed_rounds(step, args.bench_steps, args.rounds))
    return {"precision": precision, "compile_seconds": compile_seconds, "compiled_samples_per_s_per_gpu": rate,
            "eager_samples_per_s_per_gpu": eager_rate, "speedup": rate / eager_rate}


def profile_counts(prof: torch.profiler.profile, steps: int) -> dict[str, float | None]:
    """Host synchronisations and device-to-host copies per step, and the fraction of the profiled span in which the
    GPU ran a kernel or a copy (None on the CPU)."""
    events = prof.events()
    syncs = sum(1 for event in events if event.name in SYNC_CALLS)
    copies = sum(1 for event in events if "Memcpy DtoH" in event.name or "cudaMemcpy" == event.name)
    intervals = sorted((event.time_range.start, event.time_range.end) for event in events
                       if event.device_type == torch.autograd.DeviceType.CUDA)
    busy = None
    if intervals:
        covered, end = 0.0, intervals[0][0]
        for low, high in intervals:
            covered += max(0.0, high - max(low, end))
            end = max(end, high)
        busy = covered / max(intervals[-1][1] - intervals[0][0], 1e-9)
    cuda = torch.cuda.is_available()
    return {"host_syncs_per_step": syncs / steps if cuda else None,
            "dtoh_copies_per_step": copies / steps if cuda else None, "gpu_busy": busy}


def profiler(steps: int) -> torch.profiler.profile:
    """Profiles ``steps`` steps after two left out (set-up, cuDNN autotuning) and one of warm-up."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities,
                                  schedule=torch.profiler.schedule(wait=2, warmup=1, active=steps, repeat=1))


def bare_precision(args: argparse.Namespace, data: Path, precision: str) -> dict[str, Any]:
    step = bare_step(bench_config(args, data, precision, "bare"), args.ids, args.batch)
    seconds = timed_rounds(step, args.bench_steps, args.rounds)
    with profiler(PROFILED_STEPS) as prof:
        for _ in range(3 + PROFILED_STEPS):
            step()
            prof.step()
        _sync(_device())
    return {"bare_samples_per_s_per_gpu": median_rate(args.batch * args.bench_steps, seconds),
            "bare_round_seconds": seconds, "bare_profile": profile_counts(prof, PROFILED_STEPS)}


def engine_profile(args: argparse.Namespace, data: Path, precision: str) -> dict[str, float | None]:
    """The engine's steady-state steps (utils.train.loop.train in this process, no logging step among them) under
    the profiler: host synchronisations per step and the GPU's busy fraction."""
    cfg = load_config(overrides(args, data, args.work / "profile" / precision, precision)
                      + ["num_epoch=1", f"log_every={10**6}"])
    task = build_teacher_task(cfg, None)
    # Profiler step j is training step j (from its forward to the next); the epoch's last step, which reads the
    # epoch's totals, stays out.
    active = min(PROFILED_STEPS, len(task.dataset) // task.batch_size - 3)  # type: ignore[arg-type]
    prof = profiler(active)
    loss_fn = task.loss_fn

    def profiled_loss(model: nn.Module, header: nn.Module | None, batch: Batch) -> dict[str, torch.Tensor]:
        prof.step()  # a step runs from one forward to the next
        return loss_fn(model, header, batch)

    task.loss_fn = profiled_loss
    with prof:
        train(task, train_options(cfg), DistInfo(0, 0, 1, _device()))
    return profile_counts(prof, active)


def flops_per_sample(args: argparse.Namespace, data: Path) -> float:
    """Forward + backward FLOPs of one training sample (backbone and margin head), counted on the CPU."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = bench_config(args, data, "fp32", "flops")
    model, header = build_backbone(cfg).train(), make_header(cfg, args.ids).train()
    images = torch.zeros(2, 3, args.image_size, args.image_size)
    labels = torch.zeros(2, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter:
        nn.functional.cross_entropy(header(model(images), labels), labels).backward()
    return counter.get_total_flops() / 2


def adaptor_rate(args: argparse.Namespace, precision: str) -> float:
    """Bare samples/s of an SL adaptor step over ``--adaptor-classes`` identities (the paper's 27,997; teacher
    features already on the device)."""
    device = _device()
    cfg = load_config({"amp": AMP[precision]})
    torch.manual_seed(0)
    adaptor, header = nn.Linear(ADAPTOR_INPUT, 512).to(device), make_header(cfg, args.adaptor_classes, True).to(device)
    optimizer = build_sgd([{"params": list(adaptor.parameters())}, {"params": list(header.parameters())}],
                          lr=0.1, momentum=0.9, weight_decay=5e-4, device=device)
    precision_ = Precision(cfg.amp, device)
    scaler = precision_.grad_scaler(cfg.amp_init_scale)
    features = torch.randn(cfg.batch_size_fc, ADAPTOR_INPUT, device=device)
    labels = torch.randint(0, args.adaptor_classes, (cfg.batch_size_fc,), device=device)

    def step() -> None:
        with precision_.autocast():
            logits = header(adaptor(features), labels)
        loss = nn.functional.cross_entropy(logits.float(), labels)
        optimise(loss, optimizer, scaler, adaptor.parameters(), cfg.grad_clip)

    return median_rate(cfg.batch_size_fc * args.bench_steps, timed_rounds(step, args.bench_steps, args.rounds))


def loader_speed(args: argparse.Namespace, data: Path) -> dict[str, float]:
    cfg = bench_config(args, data, "fp32", "loader")
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


def extraction_speed(args: argparse.Namespace, data: Path, precision: str) -> dict[str, Any]:
    """End to end (every image decoded by the loader's workers, embedded, written to the store) and on the device
    alone (uint8 batches through the inference path)."""
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
    inference = Inference(cfg.amp, cfg.channels_last)
    model = inference.prepare(build_backbone(cfg), info.device)
    images = torch.randint(0, 256, (args.extract_batch, 3, args.image_size, args.image_size), dtype=torch.uint8)
    images = images.pin_memory() if info.device.type == "cuda" else images

    def embed() -> None:
        with torch.inference_mode(), inference.autocast(info.device):
            model(inference.inputs(images, info.device))

    device_seconds = timed_rounds(embed, max(2, args.bench_steps // 4), args.rounds)
    return {"images": len(index), "images_per_s": len(index) / seconds, "teacher": precision,
            "batch": cfg.extract_batch_size,
            "device_images_per_s": median_rate(args.extract_batch * max(2, args.bench_steps // 4), device_seconds)}


def paper_hours(engine_rate: float, adaptor_samples_per_s: float, extraction_rate: float) -> dict[str, float]:
    """Hours of the paper's work on one node of ``PAPER['gpus']`` GPUs at the measured per-GPU rates (DDP scaling
    taken as linear)."""
    gpus = PAPER["gpus"]
    hours = {"teachers": PAPER["teacher_samples"] / (engine_rate * gpus) / 3600,
             "students": PAPER["student_samples"] / (engine_rate * gpus) / 3600,
             "adaptors": PAPER["adaptor_samples"] / (adaptor_samples_per_s * gpus) / 3600,
             "extraction": PAPER["extraction_images"] / (extraction_rate * gpus) / 3600}
    hours["total"] = sum(hours.values())
    return hours


def _rate(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(result: dict[str, Any]) -> str:
    env, setup = result["environment"], result["setup"]
    device = ", ".join(env["gpus"]) if env["gpus"] else f"CPU ({env.get('cpu_threads')} threads)"
    lines = [f"GPU check: {device}; torch {env['torch']}, CUDA {env.get('cuda') or '-'}, {env['backend']} x "
             f"{env['world_size']} ranks" + (f", NCCL {env['nccl']} ({result['nccl']})" if env.get("nccl") else ""),
             f"{setup['network']} {setup['image_size']}x{setup['image_size']}, batch {setup['batch']} per rank, "
             f"{setup['epochs']} epochs of {setup['steps_per_epoch']} steps, {setup['images']} images per epoch, "
             f"{result.get('gflop_per_sample', float('nan')):.3g} GFLOP per training sample",
             "",
             f"{'precision':<9} {'loss 1st -> last':<18} {'ok':<3} {'skipped':<9} {'engine/GPU':>10} "
             f"{'bare/GPU':>9} {'ratio':>5} {'TFLOP/s':>7} {'syncs/step':>10} {'GPU busy':>8}  (samples/s)"]
    for precision, run in result["runs"].items():
        losses, engine, bare = run["losses"], run["engine_samples_per_s_per_gpu"], run.get("bare_samples_per_s_per_gpu")
        skipped = "-" if precision != "fp16" else "+".join(str(s) for s in run["skipped_steps"])
        profile = run.get("engine_profile", {})
        busy = profile.get("gpu_busy")
        lines.append(f"{precision:<9} {losses[0]:>7.3f} -> {losses[-1]:<7.3f} {'yes' if run['ok'] else 'NO':<3} "
                     f"{skipped:<9} {engine:>10.1f} {_rate(bare, 1):>9} "
                     f"{_rate(engine / bare if bare else None, 2):>5} {_rate(run.get('engine_tflops'), 1):>7} "
                     f"{_rate(profile.get('host_syncs_per_step'), 2):>10} "
                     f"{'-' if busy is None else f'{100 * busy:.0f}%':>8}")
    loader, extraction = result.get("loader"), result.get("extraction")
    if loader:
        lines += ["", f"data loader: {loader['workers']} workers, {loader['images_per_s']:.0f} images/s, "
                      f"{loader['images_per_s_per_worker']:.0f} images/s per worker"]
    if extraction:
        lines.append(f"extraction: {extraction['images']} images, {extraction['images_per_s']:.0f} images/s end to end "
                     f"({extraction['teacher']} teacher, batch {extraction['batch']}); "
                     f"{extraction['device_images_per_s']:.0f} images/s on the device alone")
    compiled = result.get("compile")
    if compiled:
        lines.append(f"torch.compile, bare loop in {compiled['precision']}: "
                     f"{compiled['compiled_samples_per_s_per_gpu']:.1f} samples/s against "
                     f"{compiled['eager_samples_per_s_per_gpu']:.1f} eager (x{compiled['speedup']:.2f}), "
                     f"{compiled['compile_seconds']:.0f} s to compile")
    for precision, hours in result.get("paper_hours", {}).items():
        lines.append(f"paper on one {PAPER['gpus']}-GPU node at the {precision} rates: {hours['total']:.1f} h "
                     f"(teachers {hours['teachers']:.1f}, students {hours['students']:.1f}, adaptors "
                     f"{hours['adaptors']:.2f}, extraction {hours['extraction']:.2f})")
    lines.append(f"result: {'PASS' if result['ok'] else 'FAIL: ' + ', '.join(result['failures'])}")
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
    parser.add_argument("--epochs", type=int, help="at least 4: epoch 1 in a first launch, the rest resumed, "
                                                    "the resumed launch's epochs after its first timed")
    parser.add_argument("--workers", type=int, help="data-loader workers per rank")
    parser.add_argument("--bench-steps", type=int, help="steps per timed round of the bare loop")
    parser.add_argument("--rounds", type=int, help="timed rounds; the median counts (at least 3)")
    parser.add_argument("--extract-batch", type=int, help="images per forward in extraction")
    parser.add_argument("--adaptor-classes", type=int, help="identities of the timed adaptor step")
    parser.add_argument("--amp-init-scale", type=float, help="fp16 GradScaler's first scale (config default if unset)")
    parser.add_argument("--nproc", type=int, help="ranks (default: every GPU, or 2 CPU ranks)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction,
                        help="time the bare loop under torch.compile too (full: on; quick, ci: off)")
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.nproc is None:
        args.nproc = torch.cuda.device_count() if torch.cuda.is_available() else 2
    if torch.cuda.is_available() and not 1 <= args.nproc <= torch.cuda.device_count():
        parser.error(f"--nproc {args.nproc}: this node has {torch.cuda.device_count()} GPUs (one rank per GPU)")
    if args.epochs < 4:
        parser.error("--epochs must be at least 4 (the resumed launch's first epoch is warm-up, two more are timed)")
    if args.rounds < 3:
        parser.error("--rounds must be at least 3 (the median of the rounds counts)")
    args.work = args.work or args.out / "work"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    data = args.work / "data"
    start = time.perf_counter()
    images = args.ids * args.images_per_id
    result: dict[str, Any] = {
        "environment": environment(args.nproc),
        "setup": {"preset": args.preset, "network": args.network, "width": args.width, "image_size": args.image_size,
                  "batch": args.batch, "epochs": args.epochs, "images": images, "workers": args.workers,
                  "steps_per_epoch": images // (args.batch * args.nproc), "precisions": args.precisions,
                  "rounds": args.rounds, "compile": args.compile},
        "runs": {}, "ok": False, "failures": ["unfinished"],
    }

    def save(section: str) -> None:
        """The figures so far, after every section: a time-out still leaves them."""
        result["seconds"] = time.perf_counter() - start
        (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"gpu_check: {section} done at {result['seconds']:.0f} s", flush=True)

    # A complete set with the same parameters is reused (a rerun after a time-out skips this).
    generate_synthetic(data, ids_per_ethnicity=args.ids, images_per_id=args.images_per_id, pairs_per_ethnicity=10,
                       image_size=args.image_size)
    result["data_seconds"] = time.perf_counter() - start
    result["gflop_per_sample"] = flops_per_sample(args, data) / 1e9
    if torch.cuda.is_available():
        result["nccl"] = nccl_smoke_test(args.work)
    save("data")
    runs = result["runs"]
    for precision in args.precisions:
        runs[precision] = run = train_precision(args, data, precision)
        save(f"{precision} training")
        run.update(bare_precision(args, data, precision))
        run["engine_profile"] = engine_profile(args, data, precision)
        run["engine_tflops"] = run["engine_samples_per_s_per_gpu"] * result["gflop_per_sample"] / 1e3
        run["adaptor_samples_per_s"] = adaptor_rate(args, precision)
        save(f"{precision} measurements")
    result["loader"] = loader_speed(args, data)
    result["extraction"] = extraction = extraction_speed(args, data, "bf16" if "bf16" in runs else args.precisions[0])
    result["paper_hours"] = {precision: paper_hours(run["engine_samples_per_s_per_gpu"], run["adaptor_samples_per_s"],
                                                    extraction["images_per_s"]) for precision, run in runs.items()}
    failures = [f"{precision}: {name}" for precision, run in runs.items()
                for name, ok in run["checks"].items() if not ok]
    if result.get("nccl", "ok") != "ok":
        failures.append(f"nccl: {result['nccl']}")
    result["ok"], result["failures"] = not failures, failures
    save("extraction")
    if args.compile:
        compiled = "bf16" if "bf16" in runs else args.precisions[0]
        result["compile"] = compile_speed(args, data, compiled, runs[compiled]["bare_samples_per_s_per_gpu"])
        save("compile")
    text = table(result)
    (args.out / "gpu_check.txt").write_text(text + "\n")
    print(text, flush=True)
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)

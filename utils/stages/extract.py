"""The extraction stage: which teachers to embed, whether their stores are current, and the sharded pass that
writes every training image's embedding into a teacher's store (format: ``utils.workdir.store``)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from backbones import build_backbone
from config.config import Config, teacher_members
from utils.core.distributed import DistInfo, barrier, broadcast_object, shard_range
from utils.core.errors import MissingInputError, ProvenanceError
from utils.core.logs import get_logger
from utils.core.progress import progress
from utils.core.signals import StopRequest, stop_on_signals
from utils.core.weights import load_weights
from utils.data.datasets import check_images
from utils.data.index import ImageIndex
from utils.data.inference import Inference, overlapped
from utils.workdir import artifacts
from utils.workdir.artifacts import member_files
from utils.workdir.inputs import dataset_for, load_index
from utils.workdir.provenance import Record, data_fingerprint, file_fingerprint, store_record
from utils.workdir.store import checked_rows, manifest_problem, read_manifest, write_rows_sharded


def train_command(teacher_set: str, member: str) -> str:
    """The train.py overrides that produce ``member`` of ``teacher_set`` (for error messages)."""
    if teacher_set == "baseline":
        return f"teacher_set=baseline split={member.removeprefix('split')}"
    return f"teacher_set=specialized ethnicity={member}"


def teacher_checkpoint(cfg: Config, member: str) -> Path:
    """The best weights of a finished teacher run; errors name the file or run that is not ready."""
    run_dir = artifacts.teacher_dir(cfg, member)
    path = artifacts.best_weights(run_dir, "teacher")
    if not path.is_file():
        raise MissingInputError(f"teacher checkpoint not found: {path} (train it: python train.py "
                                f"{train_command(cfg.teacher_set, member)} network={cfg.network})")
    if not artifacts.teacher_ready(run_dir):
        raise ProvenanceError(f"teacher run {run_dir} is not finished ({artifacts.history_file(run_dir)} lacks "
                              f"complete=true); finish it with train.py {train_command(cfg.teacher_set, member)} "
                              "resume=True before extracting")
    return path


def expected_store_record(cfg: Config, member: str, data: str) -> Record | None:
    """The record ``member``'s store must have for the teacher's current weights; None if it is not ready."""
    run_dir = artifacts.teacher_dir(cfg, member)
    checkpoint = artifacts.best_weights(run_dir, "teacher")
    if not checkpoint.is_file() or not artifacts.teacher_ready(run_dir):
        return None
    return store_record(cfg, member, data, file_fingerprint(checkpoint)["sha256"])


def teacher_store_complete(cfg: Config, member: str, index_hash: str, data: str) -> bool:
    """True when ``member``'s store is complete for the index ``index_hash``, the images of fingerprint ``data``
    and the teacher's current checkpoint."""
    record = expected_store_record(cfg, member, data)
    if record is None:
        return False
    files = member_files(artifacts.store_dir(cfg), member)
    problem = manifest_problem(read_manifest(files.manifest), files, index_hash, flipped=cfg.extract_flipped,
                               record=record)
    return problem is None


def extraction_members(cfg: Config) -> list[str]:
    """Teachers extract_all.py embeds: all four of the set with ethnicity=all, else cfg's own teacher."""
    return teacher_members(cfg.teacher_set) if cfg.ethnicity == "all" else [cfg.teacher_member]


def prepare_index(cfg: Config, info: DistInfo) -> ImageIndex:
    """The run's image index, written to the store folder by rank 0 and read from there by the other ranks,
    so every rank embeds exactly the same rows."""
    path = artifacts.store_index_file(artifacts.store_dir(cfg))
    if info.is_main:
        index = load_index(cfg)
        stored = ImageIndex.load(path).digest() if path.is_file() else None
        if stored != index.digest():
            if stored is not None:
                get_logger().warning(
                    f"{path} described another image index: replacing it; stores built from it must be redone")
            index.save(path)
    barrier()
    return index if info.is_main else ImageIndex.load(path)


def check_index_images(cfg: Config, index: ImageIndex, info: DistInfo) -> None:
    """Decode every image of ``index`` once (each rank its own rows), so a corrupt file fails now, by name, not
    hours into the extraction. A stop signal ends it between chunks of images, with nothing written."""
    shard = shard_range(len(index), info.rank, info.world_size)
    with stop_on_signals() as stop:
        check_images(dataset_for(cfg, index, np.arange(shard.start, shard.stop)), -1, workers=cfg.num_workers,
                     between_chunks=lambda: stop.raise_if_set("the image check before the extraction"))


@dataclass(frozen=True)
class StorePlan:
    """One teacher's store as rank 0 found it: what a rewrite records, and why it is needed."""

    member: str
    checkpoint: Path
    fingerprint: dict[str, Any]  # the checkpoint's path, size and sha256 (the manifest's "checkpoint")
    record: Record  # the provenance the store must have
    index_hash: str
    problem: str | None  # why the store must be (re)written; None when it is complete


def plan_extraction(cfg: Config, checkpoints: dict[str, Path], index: ImageIndex, info: DistInfo) -> list[StorePlan]:
    """Every teacher's store plan (``checkpoints``: member -> weights), decided by rank 0 and shared, so all ranks
    skip or write the same stores. The index hash and data fingerprint, seconds for a million images, are computed
    once for all members. Every rank must call this together."""
    plans: list[StorePlan] | None = None
    if info.is_main:
        index_hash, data = index.digest(), data_fingerprint(index)
        plans = []
        for member, checkpoint in checkpoints.items():
            fingerprint = file_fingerprint(checkpoint)
            record = store_record(cfg, member, data, fingerprint["sha256"])
            files = member_files(artifacts.store_dir(cfg), member)
            problem = manifest_problem(read_manifest(files.manifest), files, index_hash,
                                       flipped=cfg.extract_flipped, record=record)
            plans.append(StorePlan(member, checkpoint, fingerprint, record, index_hash, problem))
    return broadcast_object(plans)  # type: ignore[return-value]


def extract_teacher(cfg: Config, plan: StorePlan, index: ImageIndex, info: DistInfo) -> bool:
    """Embed every image of ``index`` with one teacher into its store; False when ``plan`` found it complete.

    Eval mode, unflipped (and, with cfg.extract_flipped, flipped) images, L2-normalised float32 rows.
    """
    logger = get_logger()
    member, checkpoint = plan.member, plan.checkpoint
    files = member_files(artifacts.store_dir(cfg), member)
    if plan.problem is None:
        logger.info(f"{member}: {files.array} is complete for this index and checkpoint; skipping")
        return False
    logger.info(f"{member}: extracting {len(index)} images with {checkpoint} ({plan.problem})")
    inference = Inference(cfg.amp, cfg.channels_last)
    model = inference.prepare(load_weights(build_backbone(cfg), checkpoint, what=f"{member} teacher weights"),
                              info.device)

    def forwards(loader: DataLoader, flipped: bool, stop: StopRequest) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Each batch's rows and its L2-normalised embeddings [views, B, E], left on the device."""
        for images, _, batch_rows in progress(loader, desc=f"extract {member}", enabled=info.is_main):
            stop.raise_if_set(f"the extraction of {member} into {files.array}")
            inputs = inference.inputs(images, info.device)
            views = [inputs, inputs.flip(3)] if flipped else [inputs]
            yield batch_rows.numpy(), torch.stack([F.normalize(model(view).float(), dim=1) for view in views])

    manifest = {"member": member, "teacher_set": cfg.teacher_set, "network": cfg.network, "N": len(index),
                "dim": cfg.embedding_size, "index_hash": plan.index_hash, "checkpoint": plan.fingerprint,
                "flipped": cfg.extract_flipped, "provenance": plan.record}
    with stop_on_signals() as stop:  # checked between batches: a stop leaves the store incomplete
        def fill(rows: range, arrays: dict[str, np.ndarray]) -> None:
            dataset = dataset_for(cfg, index, np.arange(rows.start, rows.stop))
            loader = DataLoader(dataset, batch_size=cfg.extract_batch_size, num_workers=cfg.num_workers,
                                pin_memory=info.device.type == "cuda")
            with torch.inference_mode(), inference.autocast(info.device):
                for rows_np, outputs in overlapped(forwards(loader, "flipped" in arrays, stop)):
                    arrays["array"][rows_np] = checked_rows(outputs[0].numpy(), rows_np, files.array, checkpoint)
                    if "flipped" in arrays:
                        arrays["flipped"][rows_np] = checked_rows(outputs[1].numpy(), rows_np, files.flipped,
                                                                  checkpoint)

        write_rows_sharded(files, manifest, info, fill)
    logger.info(f"{member}: wrote {files.array}")
    return True

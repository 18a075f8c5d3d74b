"""What the two adaptor stages share (fc_EArc.py: SL; dual_layer_EAF-Fusion.py: DuL, DLDPO).

The adaptor learns, with an ElasticArcFace head over every identity, to map the concatenation of the four
teachers' stored embeddings (``teacher_members`` order; Asian, African, Caucasian, Indian for specialized
teachers) to one embedding. Inputs come from the embedding store, never from images. The epoch with the
lowest summed training loss is kept, and its L2-normalised eval-mode outputs for every image, in index order,
become the KD target store in the run folder (``artifacts.adaptor_dir``).

Reruns: a finished run with the same provenance (settings and teacher stores) is not trained again; its targets
are written if they are missing or stale (another best weights file, other stores), else the stage does
nothing. A folder holding a run of other settings or stores is refused unless ``replace=True``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from backbones import build_adaptor
from config.config import Config, torchrun_launch
from utils.core.distributed import DistInfo, barrier, broadcast_object
from utils.core.errors import ProvenanceError
from utils.core.locks import rank0_folder_lock
from utils.core.logs import get_logger, setup_logging
from utils.core.signals import stop_on_signals
from utils.core.weights import load_weights
from utils.stages.common import classification_loss, make_header, stage_task, train_options
from utils.train.checkpoint import claim_run_folder
from utils.train.loop import train
from utils.train.task import TrainingTask
from utils.workdir import artifacts
from utils.workdir.provenance import Record, adaptor_record, file_fingerprint, run_matches, targets_record
from utils.workdir.store import (
    TeacherStores, checked_rows, manifest_problem, open_teacher_stores, read_manifest, write_rows_sharded
)

# Share of the available RAM the in-memory copies of the stores (one per local rank) may take.
MEMORY_FRACTION = 0.8


def concat_rows(arrays: Sequence[np.ndarray], rows: np.ndarray | slice) -> np.ndarray:
    """Rows of every teacher store side by side: [len(rows), sum of dims] float32, in ``arrays`` order."""
    return np.concatenate([np.asarray(array[rows], dtype=np.float32) for array in arrays], axis=1)


class ConcatStoreDataset(Dataset):
    """Adaptor samples: the concatenated teacher rows of an image, its global label, its row.

    ``__getitems__`` serves a whole batch with one gather per store (or one from the in-memory joint
    array); pair it with :func:`passthrough_collate`. Memory maps are reopened by path after pickling, so
    DataLoader workers never copy the stores.
    """

    def __init__(self, arrays: Sequence[np.ndarray], labels: np.ndarray, *, in_memory: bool) -> None:
        if not arrays or any(len(a) != len(labels) for a in arrays):
            raise ValueError(f"teacher stores of {[len(a) for a in arrays]} rows do not match {len(labels)} labels")
        self.labels = np.asarray(labels, dtype=np.int64)
        self._arrays = list(arrays)
        self._joint: np.ndarray | None = None
        if in_memory:
            self._joint = np.empty((len(labels), sum(a.shape[1] for a in arrays)), dtype=np.float32)
            start = 0
            for array in arrays:
                self._joint[:, start:start + array.shape[1]] = array
                start += array.shape[1]
            self._arrays = []

    def __len__(self) -> int:
        return len(self.labels)

    def features(self, rows: np.ndarray) -> np.ndarray:
        if self._joint is not None:
            return self._joint[rows]
        out = np.empty((len(rows), sum(a.shape[1] for a in self._arrays)), dtype=np.float32)
        start = 0
        for array in self._arrays:
            out[:, start:start + array.shape[1]] = array[rows]
            start += array.shape[1]
        return out

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return torch.from_numpy(self.features(np.array([i]))[0]), int(self.labels[i]), int(i)

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = np.asarray(indices, dtype=np.int64)
        return torch.from_numpy(self.features(rows)), torch.from_numpy(self.labels[rows]), torch.from_numpy(rows)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = [a.filename for a in self._arrays]  # type: ignore[attr-defined]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state["_arrays"] = [np.load(path, mmap_mode="r") for path in state["_arrays"]]
        self.__dict__.update(state)


def passthrough_collate(batch: Any) -> Any:
    """The dataset's ``__getitems__`` already returns the batched tensors."""
    return batch


def available_memory() -> int:
    """Bytes of RAM available to new allocations (MemAvailable on Linux, free pages elsewhere)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def load_in_memory(cfg: Config, stores: TeacherStores) -> bool:
    """cfg.store_in_memory, unless the copies of this node's ranks would not fit in RAM (then the memory map,
    whose pages the ranks share through the page cache)."""
    if not cfg.store_in_memory:
        return False
    needed = sum(a.nbytes for a in stores.arrays) * torchrun_launch().local_world_size
    if needed > MEMORY_FRACTION * available_memory():
        get_logger().warning(
            f"store_in_memory=True but the teacher stores need {needed / 2**30:.1f} GiB on this node and "
            f"{available_memory() / 2**30:.1f} GiB are available: reading them from the memory map")
        return False
    return True


def build_adaptor_task(cfg: Config, stores: TeacherStores, record: Record | None = None) -> TrainingTask:
    """The engine task of cfg.adaptor: ElasticArcFace (adaptor std) over every identity, lowest-loss epoch."""
    in_memory = load_in_memory(cfg, stores)
    get_logger().info(
        f"adaptor inputs: {len(stores.members)} teacher stores ({', '.join(stores.members)}) read "
        f"{'into RAM' if in_memory else 'from the memory map'}")
    dataset = ConcatStoreDataset(stores.arrays, stores.index.labels, in_memory=in_memory)
    return stage_task(cfg, stage="adaptor", run_dir=artifacts.adaptor_dir(cfg),
                      provenance=lambda: record or adaptor_record(cfg, stores.records), model=build_adaptor(cfg),
                      dataset=dataset, loss_fn=classification_loss,
                      header=make_header(cfg, stores.index.num_classes, adaptor_stage=True),
                      flip=False, collate_fn=passthrough_collate,
                      # Gathers from RAM take microseconds; workers only pay off when pages come from disk.
                      num_workers=0 if in_memory else cfg.num_workers)


def best_record(run_dir: Path) -> dict[str, Any]:
    """The history record of the selected epoch of a finished run."""
    best = (artifacts.read_history(run_dir) or {}).get("best")
    if not best:
        raise ProvenanceError(f"{artifacts.history_file(run_dir)} names no best epoch")
    return best


def targets_current(run_dir: Path, record: Record, index_hash: str, flipped: bool, weights_sha256: str) -> bool:
    """True when the run's target store was written from its current best weights (``weights_sha256``) for
    these teacher stores."""
    files = artifacts.target_files(run_dir)
    return manifest_problem(read_manifest(files.manifest), files, index_hash, flipped=flipped,
                            record=targets_record(record, weights_sha256)) is None


def write_targets(cfg: Config, stores: TeacherStores, record: Record, info: DistInfo, index_hash: str,
                  checkpoint: dict[str, Any] | None = None) -> Path:
    """Write the KD targets of the run's best epoch; every rank computes its own rows.

    ``index_hash`` is ``stores.index.digest()``, which the caller has computed already; ``checkpoint`` is the best
    weights' ``file_fingerprint`` when the caller has that too (None: hashed here).
    """
    run_dir = artifacts.adaptor_dir(cfg)
    weights = artifacts.best_weights(run_dir, "adaptor")
    best = best_record(run_dir)
    model = load_weights(build_adaptor(cfg), weights, what="best adaptor weights").to(info.device).eval()
    sources = {"array": stores.arrays, "flipped": stores.flipped}
    files = artifacts.target_files(run_dir)

    checkpoint = checkpoint or file_fingerprint(weights)
    manifest = {"adaptor": cfg.adaptor, "teacher_set": cfg.teacher_set, "network": cfg.network,
                "N": len(stores.index), "dim": cfg.embedding_size, "index_hash": index_hash,
                "checkpoint": checkpoint, "best_epoch": best["epoch"], "best_step": best["global_step"],
                "flipped": stores.flipped is not None, "teachers": stores.checkpoints,
                "provenance": targets_record(record, checkpoint["sha256"])}
    with stop_on_signals() as stop:  # checked between batches: a stop leaves the targets incomplete
        def fill(rows: range, arrays: dict[str, np.ndarray]) -> None:
            with torch.inference_mode():
                for start in range(rows.start, rows.stop, cfg.extract_batch_size):
                    stop.raise_if_set(f"the writing of the KD targets {files.array}")
                    chunk = slice(start, min(start + cfg.extract_batch_size, rows.stop))
                    for name, out in arrays.items():
                        x = torch.from_numpy(concat_rows(sources[name], chunk)).to(info.device)  # type: ignore[arg-type]
                        out[chunk] = checked_rows(F.normalize(model(x).float(), dim=1).cpu().numpy(),
                                                  np.arange(chunk.start, chunk.stop), getattr(files, name), weights)

        write_rows_sharded(files, manifest, info, fill)
    get_logger().info(f"KD targets of epoch {best['epoch']} written to {files.array}")
    return files.array


def _finished(cfg: Config, record: Record, index_hash: str, flipped: bool) -> tuple[dict[str, Any] | None, bool]:
    """Rank 0's view of the run folder: (the ``file_fingerprint`` of its best weights when training finished
    with this record, else None; whether its targets are current too)."""
    run_dir = artifacts.adaptor_dir(cfg)
    # Imported weights (utils/stages/release_import.py) are a finished run for the teacher stores given; only their
    # KD targets are computed here.
    trained = run_matches(run_dir, record) or (artifacts.is_imported(run_dir) and artifacts.is_run_complete(run_dir))
    if not trained:
        return None, False
    checkpoint = file_fingerprint(artifacts.best_weights(run_dir, "adaptor"))
    return checkpoint, targets_current(run_dir, record, index_hash, flipped, checkpoint["sha256"])


def run_adaptor_stage(cfg: Config, info: DistInfo) -> Path | None:
    """Train cfg.adaptor on the teacher stores (or reuse a finished run) and write its KD targets.

    Returns the target array, or None when training stopped early (``stop_after_epoch``). The run folder is
    locked for the training and the targets together.
    """
    with rank0_folder_lock(artifacts.adaptor_dir(cfg), info.is_main, what="adaptor run folder"):
        return _train_and_write_targets(cfg, info)


def _train_and_write_targets(cfg: Config, info: DistInfo) -> Path | None:
    run_dir = artifacts.adaptor_dir(cfg)
    stores = open_teacher_stores(cfg)
    record = adaptor_record(cfg, stores.records)
    index_hash = stores.index.digest()
    flipped = stores.flipped is not None
    finished = _finished(cfg, record, index_hash, flipped) if info.is_main else None
    checkpoint, done = broadcast_object(finished)  # type: ignore[misc]
    if checkpoint is not None:
        logger = setup_logging(artifacts.log_file(run_dir), info.is_main)
        if done:
            logger.info(f"{run_dir}: training and KD targets are complete for these teacher stores; nothing to do")
            return artifacts.target_files(run_dir).array
        logger.info(f"{run_dir}: training is complete; writing its KD targets")
    else:
        # Claimed before the task is built: a folder of another run is refused (or moved aside with replace=True)
        # before the stores are loaded, and the task's log lines go to this run's log.
        logger = claim_run_folder(run_dir, lambda: record, replace=cfg.replace, is_main=info.is_main)
        result = train(build_adaptor_task(cfg, stores, record), train_options(cfg), info, logger=logger)
        if not result.complete:
            logger.info("training stopped before its last epoch; the KD targets are written once it completes")
            return None
    barrier()
    return write_targets(cfg, stores, record, info, index_hash, checkpoint)

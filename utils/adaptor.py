"""What the two adaptor stages share (fc_EArc.py: SL; dual_layer_EAF-Fusion.py: DuL, DLDPO).

The adaptor learns, with an ElasticArcFace head over every identity, to map the concatenation of the four
teachers' stored embeddings (``teacher_members`` order; Asian, African, Caucasian, Indian for specialized
teachers) to one embedding. Inputs come from the embedding store, never from images. The epoch with the
lowest summed training loss is kept, and its L2-normalised eval-mode outputs for every image, in index order,
become the KD target store in ``cfg.adaptor_dir``.

Reruns: a finished run trained on the same teacher stores is not trained again; its targets are written if
they are missing or stale, else the stage does nothing. ``teacher_stores.json`` records which stores (index
hash and teacher checkpoints) a run was trained on; to retrain on the same stores, delete the folder.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from backbones import build_adaptor, load_weights
from config.config import Config
from utils.callbacks import LOGGER_NAME, setup_logging
from utils.distributed import DistInfo, barrier, broadcast_object
from utils.embedding_store import (
    TeacherStores, checked_rows, file_fingerprint, manifest_problem, open_teacher_stores, read_manifest, target_files,
    write_rows_sharded)
from utils.engine import HISTORY_NAME, TrainingTask, classification_loss, is_run_complete, make_header, train
from utils.io import atomic_write_json
from utils.locks import rank0_folder_lock

INPUTS_NAME = "teacher_stores.json"
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
    needed = sum(a.nbytes for a in stores.arrays) * int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if needed > MEMORY_FRACTION * available_memory():
        logging.getLogger(LOGGER_NAME).warning(
            f"store_in_memory=True but the teacher stores need {needed / 2**30:.1f} GiB on this node and "
            f"{available_memory() / 2**30:.1f} GiB are available: reading them from the memory map")
        return False
    return True


def build_adaptor_task(cfg: Config, stores: TeacherStores) -> TrainingTask:
    """The engine task of cfg.adaptor: ElasticArcFace (adaptor std) over every identity, lowest-loss epoch."""
    in_memory = load_in_memory(cfg, stores)
    logging.getLogger(LOGGER_NAME).info(
        f"adaptor inputs: {len(stores.members)} teacher stores ({', '.join(stores.members)}) read "
        f"{'into RAM' if in_memory else 'from the memory map'}")
    dataset = ConcatStoreDataset(stores.arrays, stores.index.labels, in_memory=in_memory)
    return TrainingTask(
        stage="adaptor",
        run_dir=cfg.adaptor_dir,
        model=build_adaptor(cfg),
        model_name="adaptor",
        dataset=dataset,
        loss_fn=classification_loss,
        lr=cfg.scaled_lr_fc,
        num_epochs=cfg.num_epoch_fc,
        milestones=cfg.milestones_fc,
        batch_size=cfg.batch_size_fc,
        header=make_header(cfg, stores.index.num_classes, adaptor_stage=True),
        flip=False,
        selection="loss",
        collate_fn=passthrough_collate,
        # Gathers from RAM take microseconds; workers only pay off when pages come from disk.
        num_workers=0 if in_memory else cfg.num_workers,
    )


def best_record(run_dir: Path) -> dict[str, Any]:
    """The history record of the selected epoch of a finished run."""
    path = Path(run_dir) / HISTORY_NAME
    best = json.loads(path.read_text()).get("best")
    if not best:
        raise RuntimeError(f"{path} names no best epoch")
    return best


def targets_current(cfg: Config, inputs: dict[str, Any], weights: Path, flipped: bool) -> bool:
    """True when the target store was written from ``weights`` for these teacher stores."""
    files = target_files(cfg.adaptor_dir)
    manifest = read_manifest(files.manifest)
    if manifest_problem(manifest, files, inputs["index_hash"], flipped=flipped) is not None:
        return False
    return (manifest.get("teachers") == inputs["teachers"]  # type: ignore[union-attr]
            and manifest.get("checkpoint", {}).get("sha256") == file_fingerprint(weights)["sha256"])  # type: ignore[union-attr]


def write_targets(cfg: Config, stores: TeacherStores, inputs: dict[str, Any], info: DistInfo) -> Path:
    """Write the KD targets of the run's best epoch; every rank computes its own rows."""
    weights = cfg.adaptor_dir / "best_adaptor.pth"
    best = best_record(cfg.adaptor_dir)
    model = load_weights(build_adaptor(cfg), weights, what="best adaptor weights").to(info.device).eval()
    sources = {"array": stores.arrays, "flipped": stores.flipped}
    files = target_files(cfg.adaptor_dir)

    def fill(rows: range, arrays: dict[str, np.ndarray]) -> None:
        with torch.inference_mode():
            for start in range(rows.start, rows.stop, cfg.extract_batch_size):
                chunk = slice(start, min(start + cfg.extract_batch_size, rows.stop))
                for name, out in arrays.items():
                    x = torch.from_numpy(concat_rows(sources[name], chunk)).to(info.device)  # type: ignore[arg-type]
                    out[chunk] = checked_rows(F.normalize(model(x).float(), dim=1).cpu().numpy(),
                                              np.arange(chunk.start, chunk.stop), getattr(files, name), weights)

    manifest = {"adaptor": cfg.adaptor, "teacher_set": cfg.teacher_set, "network": cfg.network,
                "N": len(stores.index), "dim": cfg.embedding_size, "index_hash": inputs["index_hash"],
                "checkpoint": file_fingerprint(weights), "best_epoch": best["epoch"],
                "best_step": best["global_step"], "flipped": stores.flipped is not None,
                "teachers": inputs["teachers"]}
    write_rows_sharded(files, manifest, info, fill)
    return files.array


def _decide(cfg: Config, inputs: dict[str, Any], flipped: bool) -> tuple[str | None, bool, bool]:
    """Rank 0's view of the run folder: (error, training finished on these stores, targets current too).

    Before a (re)training it records the stores and marks stale targets incomplete, so they cannot pass for
    this run's while it trains.
    """
    run_dir = cfg.adaptor_dir
    inputs_path = run_dir / INPUTS_NAME
    recorded = json.loads(inputs_path.read_text()) if inputs_path.is_file() else None
    if recorded is not None and recorded != inputs and cfg.resume:
        return (f"{run_dir} was trained on other teacher stores ({inputs_path}); delete the folder to train on "
                "the current ones, or run without resume=True to start over", False, False)
    trained = recorded == inputs and is_run_complete(run_dir)
    done = trained and targets_current(cfg, inputs, run_dir / "best_adaptor.pth", flipped)
    if not trained:
        atomic_write_json(inputs_path, inputs)
        files = target_files(run_dir)
        manifest = read_manifest(files.manifest)
        if manifest is not None:
            atomic_write_json(files.manifest, {**manifest, "complete": False})
    return None, trained, done


def run_adaptor_stage(cfg: Config, info: DistInfo) -> Path | None:
    """Train cfg.adaptor on the teacher stores (or reuse a finished run) and write its KD targets.

    Returns the target array, or None when training stopped early (``stop_after_epoch``). The run folder is
    locked for the training and the targets together.
    """
    with rank0_folder_lock(cfg.adaptor_dir, info.is_main, what="adaptor run folder"):
        return _train_and_write_targets(cfg, info)


def _train_and_write_targets(cfg: Config, info: DistInfo) -> Path | None:
    run_dir = cfg.adaptor_dir
    logger = setup_logging(run_dir, info.is_main)
    stores = open_teacher_stores(cfg)
    inputs = {"index_hash": stores.index.digest(), "teacher_set": cfg.teacher_set, "teachers": stores.checkpoints}
    flipped = stores.flipped is not None
    decision = None
    if info.is_main:
        decision = _decide(cfg, inputs, flipped)
    error, trained, done = broadcast_object(decision)  # type: ignore[misc]
    if error:
        raise RuntimeError(error)
    if done:
        logger.info(f"{run_dir}: training and KD targets are complete for these teacher stores; nothing to do")
        return target_files(run_dir).array
    if trained:
        logger.info(f"{run_dir}: training is complete; writing its KD targets")
    else:
        result = train(cfg, build_adaptor_task(cfg, stores), info)
        if not result.complete:
            logger.info("training stopped before its last epoch; the KD targets are written once it completes")
            return None
    barrier()
    path = write_targets(cfg, stores, inputs, info)
    logger.info(f"KD targets of epoch {best_record(run_dir)['epoch']} written to {path}")
    return path

"""How learnable are the KD targets? Geometry of every adaptor's target store and its students' KD curves.

    python -m eval.kd_targets WORK_ROOT [--sample 4000]

For each adaptor run under ``WORK_ROOT`` (the ``output_root`` of a pipeline run) this prints:

* soundness: the epoch that wrote the targets (manifest) against the lowest summed training loss of the
  history, and the largest difference between stored rows and the rows recomputed from ``best_adaptor.pth``
  in eval mode (and, for a dropout adaptor, in train mode, which must differ);
* geometry of the unit-norm targets: the norm of their mean (1 = every row the same direction), the effective
  rank of the centred rows (exp of the entropy of the normalised squared singular values), the between- and
  within-identity variance (mean squared distance of identity means to the global mean, and of rows to their
  identity mean), the mean cosine between rows of one identity and of different identities, and the
  between-identity variance inside each ethnicity;
* the KD loss a constant student reaches (``loss_lambda * MSE`` to the normalised mean of the targets): an
  identity-blind student gets this far, so a student whose KD loss ends near it has learned little of the
  identities. Each student trained from the store follows with its KD loss per epoch and the share of the
  constant-student loss its last epoch removed.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from backbones import build_adaptor
from config.config import ETHNICITIES, Config
from utils.core.errors import MissingInputError
from utils.core.weights import load_weights
from utils.stages.adaptor import concat_rows
from utils.stages.cli import run_tool
from utils.workdir import artifacts
from utils.workdir.runs import find_runs
from utils.workdir.store import TeacherStores, open_teacher_stores, read_manifest


def target_geometry(targets: np.ndarray, labels: np.ndarray, ethnicity: np.ndarray, *,
                    rows: np.ndarray) -> dict[str, Any]:
    """Statistics of unit-norm rows ``targets`` [N, D] with identity ``labels`` and ``ethnicity`` codes; the
    cosines are taken over the ``rows`` sample."""
    targets = np.asarray(targets, dtype=np.float64)
    mean = targets.mean(0)
    singular = np.linalg.svd(targets - mean, compute_uv=False)
    share = singular ** 2 / np.sum(singular ** 2)
    share = share[share > 0]

    def spread(rows: np.ndarray, ids: np.ndarray) -> tuple[float, float]:
        classes, inverse = np.unique(ids, return_inverse=True)
        means = np.stack([rows[inverse == k].mean(0) for k in range(len(classes))])
        between = float(np.mean(np.sum((means - rows.mean(0)) ** 2, axis=1)))
        within = float(np.mean(np.sum((rows - means[inverse]) ** 2, axis=1)))
        return between, within

    between, within = spread(targets, labels)
    gram, same = targets[rows] @ targets[rows].T, labels[rows][:, None] == labels[rows][None, :]
    np.fill_diagonal(same, False)
    different = labels[rows][:, None] != labels[rows][None, :]
    per_ethnicity = {eth: spread(targets[ethnicity == code], labels[ethnicity == code])[0]
                     for code, eth in enumerate(ETHNICITIES) if np.any(ethnicity == code)}
    return {"mean_norm": float(np.linalg.norm(mean)), "effective_rank": float(np.exp(-np.sum(share * np.log(share)))),
            "between": between, "within": within, "cos_same": float(gram[same].mean()),
            "cos_different": float(gram[different].mean()), "between_per_ethnicity": per_ethnicity,
            "constant_kd": float(np.mean(np.sum((targets - mean / np.linalg.norm(mean)) ** 2, axis=1))
                                 / targets.shape[1])}


def _history(run_dir: Path) -> dict[str, Any]:
    history = artifacts.read_history(run_dir)
    if history is None:
        raise MissingInputError(f"run {run_dir} has no training history {artifacts.history_file(run_dir).name}")
    return history


def check_targets(cfg: Config, stores: TeacherStores, targets: np.ndarray, rows: np.ndarray) -> dict[str, Any]:
    """Recompute ``rows`` of the targets from the teacher ``stores`` and ``best_adaptor.pth`` (eval and train
    mode)."""
    run_dir = artifacts.adaptor_dir(cfg)
    model = load_weights(build_adaptor(cfg), artifacts.best_weights(run_dir, "adaptor"), what="best adaptor weights")
    x = torch.from_numpy(concat_rows(stores.arrays, rows))
    stored = torch.from_numpy(np.asarray(targets[rows], dtype=np.float32))
    with torch.no_grad():
        eval_rows = F.normalize(model.eval()(x), dim=1)
        torch.manual_seed(0)
        train_rows = F.normalize(model.train()(x), dim=1)
    history = _history(run_dir)
    lowest = min(history["epochs"], key=lambda record: record["loss_sum"])
    return {"eval_max_diff": float((eval_rows - stored).abs().max()),
            "train_max_diff": float((train_rows - stored).abs().max()),
            "written_epoch": read_manifest(artifacts.target_files(run_dir).manifest)["best_epoch"],  # type: ignore[index]
            "lowest_loss_epoch": lowest["epoch"], "epoch_losses": [r["loss_sum"] for r in history["epochs"]]}


def analyse(work_root: Path, sample: int) -> list[dict[str, Any]]:
    """One record per adaptor run under ``work_root``: soundness, geometry and its students' KD curves."""
    runs = find_runs(work_root)
    records = []
    for run_dir, cfg, stage in runs:
        if stage != "adaptor":
            continue
        stores = open_teacher_stores(cfg)
        targets = np.load(artifacts.target_files(run_dir).array, mmap_mode="r")
        rows = np.random.default_rng(0).permutation(len(targets))[:sample]
        students = {}
        for student_dir, student_cfg, student_stage in runs:
            if student_stage == "student" and artifacts.adaptor_dir(student_cfg) == run_dir:
                epochs = _history(student_dir)["epochs"]
                students[f"{student_cfg.kd} {student_cfg.student_network}"] = [
                    record["losses"]["kd"] for record in epochs]
        geometry = target_geometry(targets, stores.index.labels, stores.index.ethnicity, rows=rows)
        geometry["constant_kd"] *= cfg.loss_lambda
        # Sorted, the recomputation reads the memory-mapped stores and targets front to back.
        records.append({"name": f"{cfg.teacher_set} {cfg.adaptor}", "run_dir": str(run_dir),
                        **check_targets(cfg, stores, targets, np.sort(rows)), **geometry, "students": students})
    return records


def format_records(records: list[dict[str, Any]]) -> str:
    lines = [f"{'targets':<17} {'|mean|':>6} {'eff.rank':>8} {'between':>8} {'within':>7} {'ratio':>6} "
             f"{'cos same':>8} {'cos diff':>8} {'const KD':>8}  between per ethnicity ({', '.join(ETHNICITIES)})"]
    for r in records:
        per = " ".join(f"{r['between_per_ethnicity'].get(eth, float('nan')):.3f}" for eth in ETHNICITIES)
        lines.append(f"{r['name']:<17} {r['mean_norm']:>6.3f} {r['effective_rank']:>8.1f} {r['between']:>8.3f} "
                     f"{r['within']:>7.3f} {r['between'] / r['within']:>6.1f} {r['cos_same']:>8.3f} "
                     f"{r['cos_different']:>8.3f} {r['constant_kd']:>8.2f}  {per}")
    lines.append("\nsoundness: epoch that wrote the targets vs lowest summed loss; max |stored - recomputed| in eval "
                 "mode (train mode)")
    for r in records:
        lines.append(f"{r['name']:<17} written by epoch {r['written_epoch']}, lowest loss epoch "
                     f"{r['lowest_loss_epoch']}; eval {r['eval_max_diff']:.1e} (train {r['train_max_diff']:.1e}); "
                     f"epoch losses {' '.join(f'{loss:.0f}' for loss in r['epoch_losses'])}")
    lines.append("\nstudents: KD loss per epoch; last epoch vs the constant student")
    for r in records:
        for name, curve in r["students"].items():
            lines.append(f"{r['name']:<17} {name:<18} {' '.join(f'{v:.2f}' for v in curve)}  -> "
                         f"{100 * (1 - curve[-1] / r['constant_kd']):.0f}% below constant ({r['constant_kd']:.2f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work_root", type=Path, help="output_root of a pipeline run (holds adaptors/, students/)")
    parser.add_argument("--sample", type=int, default=4000, help="rows for the cosines and the recomputation")
    args = parser.parse_args(argv)
    if args.sample < 1:
        parser.error(f"--sample {args.sample}: give a number >= 1")
    run_tool(lambda: print(format_records(analyse(args.work_root, args.sample))))


if __name__ == "__main__":
    main()

"""RFW / LFW-style face verification: flip-TTA embeddings and the 10-fold threshold protocol.

The protocol is the insightface one used by RFW papers: squared Euclidean distance between the
L2-normalised embeddings of each pair; ten folds taken in order; on nine folds the threshold in
``0, 0.01, ..., 3.99`` with the best accuracy is chosen (the first one on ties, as ``np.argmax``) and
applied to the held-out fold. The implementation counts errors for every threshold at once from sorted
distances, which gives exactly the numbers of the plain 400-threshold loop in a fraction of its time.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from config.config import ETHNICITIES
from eval.rfw.pairs import find_rfw_source, load_benchmarks, load_rfw
from utils.data.image import normalize_images

# The protocol's threshold grid; `np.arange` is kept (not a linspace) so the floats equal the reference ones.
THRESHOLDS = np.arange(0, 4, 0.01)
FARS = (1e-3, 1e-4)

EmbedFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class VerificationResult:
    """Verification metrics of one pair set. Accuracies are fractions in [0, 1]."""

    accuracy: float  # mean held-out accuracy over the folds
    accuracy_std: float  # population std of the fold accuracies
    threshold: float  # mean of the per-fold best thresholds (squared distance)
    fold_accuracies: np.ndarray
    fold_thresholds: np.ndarray
    # The pairs themselves, for the ROC below, bootstrap intervals and operating-point rates (eval/bootstrap.py).
    distances: np.ndarray = field(repr=False)
    issame: np.ndarray = field(repr=False)
    # Why the numbers measure nothing ("" when they do): e.g. every pair has the same score, so the accuracy is
    # chance on every group and the groups look "perfectly fair" while the model is broken.
    degenerate: str = ""

    # The ROC is computed on first use: a training run's per-epoch check reads only the accuracy, and the ROC
    # needs scikit-learn, about a second of start-up in every stage process.
    @cached_property
    def _roc(self) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.metrics import roc_curve

        fpr, tpr, _ = roc_curve(self.issame, -self.distances, drop_intermediate=False)
        return fpr, tpr

    @property
    def fpr(self) -> np.ndarray:
        return self._roc[0]

    @property
    def tpr(self) -> np.ndarray:
        return self._roc[1]

    @cached_property
    def auc(self) -> float:
        from sklearn.metrics import auc

        return float(auc(self.fpr, self.tpr))

    @property
    def num_impostors(self) -> int:
        return int((~self.issame).sum())

    @property
    def min_far(self) -> float:
        """1 / (number of impostor pairs): the smallest FAR these pairs can measure."""
        return 1.0 / self.num_impostors

    @cached_property
    def tar_at_far(self) -> dict[float, float]:
        """TAR at the operating point with the highest TAR whose FAR does not exceed the key; NaN where the key is
        below 1 / (number of impostor pairs): with 3000 impostors (RFW) FAR=1e-4 could only mean "no false
        accept at all", which is not a measurement of FAR 1e-4."""
        return {far: tar_at_far(self.fpr, self.tpr, far, self.num_impostors) for far in FARS}

    def summary(self) -> dict[str, float | None]:
        """JSON-friendly scalars (ROC arrays left out); a TAR that cannot be measured is None."""
        out: dict[str, float | None] = {
            "accuracy": self.accuracy,
            "accuracy_std": self.accuracy_std,
            "threshold": self.threshold,
            "auc": self.auc,
            "min_measurable_far": self.min_far,
        }
        out.update({f"tar@far={far:g}": None if np.isnan(tar) else tar for far, tar in self.tar_at_far.items()})
        return out


def tar_at_far(fpr: np.ndarray, tpr: np.ndarray, far: float, num_impostors: int) -> float:
    """Highest TAR with FAR <= ``far``, or NaN when ``far`` < 1 / ``num_impostors`` (not measurable)."""
    if far * num_impostors < 1:
        return float("nan")
    return float(tpr[fpr <= far].max())


class ImageOutputs(NamedTuple):
    """Raw float32 outputs ``[2N, E]`` of a network for a pair set's images and, with flip TTA, their mirror images."""

    plain: torch.Tensor
    flipped: torch.Tensor | None

    def embeddings(self) -> np.ndarray:
        """L2-normalised embeddings: ``plain + flipped`` (flip TTA) or ``plain``, normalised."""
        summed = self.plain if self.flipped is None else self.plain + self.flipped
        return F.normalize(summed, dim=1).numpy()


def image_outputs(
    embed_fn: EmbedFn,
    images: torch.Tensor | np.ndarray,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    flip: bool = True,
) -> ImageOutputs:
    """Outputs of ``embed_fn`` for uint8 RGB images ``[2N, 3, S, S]`` (and their horizontal flips), on the CPU.
    ``embed_fn`` receives batches already scaled to ``[-1, 1]``."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images [N, 3, S, S], got {tuple(images.shape)} {images.dtype}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if images.shape[0] == 0:
        raise ValueError("no images to embed")
    plain, flipped = [], []
    with torch.inference_mode():
        for start in range(0, images.shape[0], batch_size):
            batch = normalize_images(images[start:start + batch_size].to(device, non_blocking=True))
            plain.append(embed_fn(batch).float().cpu())
            if flip:
                flipped.append(embed_fn(torch.flip(batch, dims=[3])).float().cpu())
    return ImageOutputs(torch.cat(plain), torch.cat(flipped) if flip else None)


def embed_images(
    embed_fn: EmbedFn,
    images: torch.Tensor | np.ndarray,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    flip: bool = True,
) -> np.ndarray:
    """L2-normalised float32 embeddings ``[2N, E]`` of uint8 RGB images ``[2N, 3, S, S]``.

    With ``flip`` each embedding is ``embed_fn(x) + embed_fn(hflip(x))`` before normalisation (the
    standard test-time augmentation). ``embed_fn`` receives batches already scaled to ``[-1, 1]``.
    """
    return image_outputs(embed_fn, images, batch_size, device, flip).embeddings()


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Run in eval mode and restore every submodule's own mode afterwards (safe inside a training loop)."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, mode in saved:
            m.training = mode


def backbone_embed_fn(model: nn.Module) -> EmbedFn:
    """Embedding function of one backbone, evaluated in eval mode (pass the unwrapped, non-DDP module)."""

    def embed(batch: torch.Tensor) -> torch.Tensor:
        with eval_mode(model):
            return model(batch)

    return embed


def teacher_concatenation(outputs: Sequence[torch.Tensor], *, raw_teachers: bool = False) -> torch.Tensor:
    """The adaptor's input: the four teachers' outputs, L2-normalised (as in the stores the adaptors are trained
    on) or raw (``raw_teachers``, as the release's adaptor test), concatenated in the order given."""
    if len(outputs) != 4:
        raise ValueError(f"the multi-teacher space needs exactly 4 teachers, got {len(outputs)}")
    return torch.cat(list(outputs) if raw_teachers else [F.normalize(o.float(), dim=1) for o in outputs], dim=1)


def multi_teacher_embed_fn(teachers: Sequence[nn.Module], adaptor: nn.Module, *,
                           raw_teachers: bool = False) -> EmbedFn:
    """The multi-teacher space: adaptor(concat of the L2-normalised teacher embeddings).

    The adaptors are trained on L2-normalised teacher embeddings (the stores), so that is the default.
    ``raw_teachers`` concatenates the teachers' unnormalised outputs instead, as the release's adaptor test
    (``adaptor_test``) does; use it only to reproduce the release's evaluation of its adaptors.

    ``teachers`` must be the four teachers in concatenation order (``config.CONCAT_ORDER``: Asian,
    African, Caucasian, Indian for specialized teachers; ``config.BASELINE_CONCAT_ORDER``: split1, split0,
    split2, split3 for baseline ones); the released adaptors only work in that order.
    """
    teachers = list(teachers)
    if len(teachers) != 4:
        raise ValueError(f"the multi-teacher space needs exactly 4 teachers, got {len(teachers)}")

    def embed(batch: torch.Tensor) -> torch.Tensor:
        with eval_mode(adaptor, *teachers):
            return adaptor(teacher_concatenation([t(batch).float() for t in teachers], raw_teachers=raw_teachers))

    return embed


def adaptor_outputs(teacher_outputs: Sequence[ImageOutputs], adaptor: nn.Module, *, raw_teachers: bool = False,
                    batch_size: int = 256, device: str | torch.device = "cpu") -> ImageOutputs:
    """The multi-teacher space from outputs its four teachers already gave for the same images (in
    concatenation order): what :func:`multi_teacher_embed_fn` computes, without running the teachers again."""
    def head(outputs: list[torch.Tensor]) -> torch.Tensor:
        rows = []
        with torch.inference_mode(), eval_mode(adaptor):
            for start in range(0, outputs[0].shape[0], batch_size):
                chunk = [o[start:start + batch_size].to(device) for o in outputs]
                rows.append(adaptor(teacher_concatenation(chunk, raw_teachers=raw_teachers)).float().cpu())
        return torch.cat(rows)

    flipped = [t.flipped for t in teacher_outputs]
    return ImageOutputs(head([t.plain for t in teacher_outputs]),
                        None if any(f is None for f in flipped) else head(flipped))  # type: ignore[arg-type]


def pair_distances(embeddings: np.ndarray) -> np.ndarray:
    """Squared Euclidean distance (float64) between rows 2i and 2i+1."""
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or embeddings.shape[0] % 2:
        raise ValueError(f"expected embeddings [2N, E] of N pairs, got shape {embeddings.shape}")
    diff = embeddings[0::2].astype(np.float64) - embeddings[1::2].astype(np.float64)
    return np.einsum("ij,ij->i", diff, diff)


def fold_sizes(n: int, nfolds: int) -> np.ndarray:
    """Fold sizes of an in-order split (the first ``n % nfolds`` folds get one more, like sklearn KFold)."""
    sizes = np.full(nfolds, n // nfolds, dtype=np.int64)
    sizes[: n % nfolds] += 1
    return sizes


def fold_bounds(n: int, nfolds: int) -> np.ndarray:
    """Where the folds of :func:`fold_sizes` start, then ``n``: fold ``f`` is ``bounds[f]:bounds[f + 1]``."""
    return np.concatenate([[0], np.cumsum(fold_sizes(n, nfolds))])


def pair_set_problem(issame: np.ndarray, nfolds: int) -> str | None:
    """Why a pair set cannot give a meaningful k-fold accuracy (no pairs, fewer pairs than folds, a class
    missing overall or in one fold, where a held-out accuracy of 0 would read as "below chance"); None if it can."""
    issame = np.asarray(issame, dtype=bool)
    n = len(issame)
    if n == 0:
        return "holds 0 pairs"
    if n < nfolds:
        return f"holds {n} pairs, fewer than the {nfolds} folds of the protocol"
    bounds = fold_bounds(n, nfolds)
    for f in range(nfolds):
        fold = issame[bounds[f]:bounds[f + 1]]
        if fold.all() or not fold.any():
            kind = "genuine" if fold.all() else "impostor"
            return (f"fold {f + 1} of {nfolds} (pairs {bounds[f]}..{bounds[f + 1] - 1}) holds only {kind} pairs; "
                    "every fold needs both (folds are taken in file order)")
    return None


def kfold_accuracy(
    distances: np.ndarray, issame: np.ndarray, nfolds: int = 10, thresholds: np.ndarray = THRESHOLDS
) -> tuple[np.ndarray, np.ndarray]:
    """Held-out accuracy and chosen threshold per fold: ``(fold_accuracies, fold_thresholds)``.

    A pair is predicted genuine when ``distance < threshold``. For every fold and threshold it counts the
    genuine and impostor pairs below the threshold with one ``searchsorted``; training-fold counts are the
    totals minus the fold's own. Accuracies are formed as ``correct / size`` like the reference loop, so
    the argmax (and its tie-breaking) is identical.
    """
    distances = np.asarray(distances, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    n = distances.shape[0]
    if distances.ndim != 1 or issame.shape != (n,):
        raise ValueError(f"distances {distances.shape} and issame {issame.shape} must be 1-D of equal length")
    if n < nfolds:
        raise ValueError(f"{n} pairs cannot be split into {nfolds} folds")
    bounds = fold_bounds(n, nfolds)
    # [F, T] counts of genuine / impostor pairs of each fold with distance < threshold.
    gen_below = np.empty((nfolds, thresholds.size), dtype=np.int64)
    imp_below = np.empty_like(gen_below)
    n_gen = np.empty(nfolds, dtype=np.int64)
    n_imp = np.empty(nfolds, dtype=np.int64)
    for f in range(nfolds):
        d, same = distances[bounds[f]:bounds[f + 1]], issame[bounds[f]:bounds[f + 1]]
        gen, imp = np.sort(d[same]), np.sort(d[~same])
        gen_below[f] = np.searchsorted(gen, thresholds, side="left")
        imp_below[f] = np.searchsorted(imp, thresholds, side="left")
        n_gen[f], n_imp[f] = gen.size, imp.size
    # Correct = true accepts (genuine below) + true rejects (impostors not below).
    fold_correct = gen_below + (n_imp[:, None] - imp_below)
    train_correct = fold_correct.sum(axis=0, keepdims=True) - fold_correct
    sizes = np.diff(bounds)
    train_acc = train_correct / (n - sizes)[:, None]
    best = np.argmax(train_acc, axis=1)
    fold_acc = fold_correct[np.arange(nfolds), best] / sizes
    return fold_acc, thresholds[best]


def verify_distances(distances: np.ndarray, issame: np.ndarray, nfolds: int = 10) -> VerificationResult:
    """All verification metrics from pair distances (squared Euclidean) and genuine/impostor labels."""
    issame = np.asarray(issame, dtype=bool)
    distances = np.asarray(distances, dtype=np.float64)
    if issame.all() or not issame.any():
        raise ValueError("verification needs both genuine and impostor pairs")
    degenerate = ""
    if not np.isfinite(distances).all():
        degenerate = "non-finite embeddings"
        # Scored as "no pair below any threshold": chance accuracy, flagged, never an error in the middle of a run.
        distances = np.where(np.isfinite(distances), distances, THRESHOLDS[-1] + 1)
    if np.ptp(distances) == 0:
        degenerate = degenerate or "all pair scores equal (constant embeddings)"
    fold_acc, fold_thr = kfold_accuracy(distances, issame, nfolds)
    return VerificationResult(
        accuracy=float(fold_acc.mean()),
        accuracy_std=float(fold_acc.std()),
        threshold=float(fold_thr.mean()),
        fold_accuracies=fold_acc,
        fold_thresholds=fold_thr,
        distances=distances,
        issame=issame,
        degenerate=degenerate,
    )


def verify(embeddings: np.ndarray, issame: np.ndarray, nfolds: int = 10) -> VerificationResult:
    """Verification metrics of ``[2N, E]`` embeddings (rows 2i, 2i+1 form pair i) and ``issame [N]``."""
    distances = pair_distances(embeddings)
    if np.asarray(issame).shape != distances.shape:
        raise ValueError(f"issame has {np.asarray(issame).shape} labels for {distances.shape[0]} pairs")
    return verify_distances(distances, issame, nfolds)


class RFWEvaluator:
    """Loads the RFW pairs (``.bin`` files or the distributed layout) and any ``val_targets`` benchmarks
    once, and evaluates embedding functions on them.

    Calling it returns ``{name: VerificationResult}``: the ethnicities first, then the benchmarks by name.
    """

    def __init__(
        self,
        rfw_root: str | Path,
        input_size: int,
        batch_size: int = 256,
        ethnicities: Sequence[str] = ETHNICITIES,
        nfolds: int = 10,
        *,
        allow_resize: bool = False,
        val_root: str | Path | None = None,
        val_targets: Sequence[str] = (),
    ) -> None:
        clash = set(val_targets) & set(ethnicities)
        if clash:
            raise ValueError(f"val_targets {sorted(clash)} clash with RFW ethnicity names")
        self.rfw_root = Path(rfw_root)
        self.input_size = input_size
        self.batch_size = batch_size
        self.nfolds = nfolds
        self.data = load_rfw(self.rfw_root, input_size, ethnicities=tuple(ethnicities), allow_resize=allow_resize)
        for eth, (_, issame) in self.data.items():
            problem = pair_set_problem(issame, nfolds)
            if problem is not None:
                raise ValueError(f"{find_rfw_source(self.rfw_root, eth).path} ({eth}): {problem}")
        self.data.update(load_benchmarks(val_root, list(val_targets), input_size, allow_resize))

    def outputs(self, embed_fn: EmbedFn, device: str | torch.device = "cpu") -> dict[str, ImageOutputs]:
        """The raw outputs (with flip TTA) of every pair set's images, by name."""
        return {name: image_outputs(embed_fn, images, batch_size=self.batch_size, device=device, flip=True)
                for name, (images, _) in self.data.items()}

    def verify_outputs(self, outputs: dict[str, ImageOutputs]) -> dict[str, VerificationResult]:
        return {name: verify(outputs[name].embeddings(), issame, self.nfolds)
                for name, (_, issame) in self.data.items()}

    def __call__(self, embed_fn: EmbedFn, device: str | torch.device = "cpu") -> dict[str, VerificationResult]:
        return self.verify_outputs(self.outputs(embed_fn, device))

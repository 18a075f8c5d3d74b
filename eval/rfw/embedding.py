"""Flip-TTA embeddings of pair sets, single networks and the multi-teacher adaptor space, and the RFW evaluator
that loads the pairs once and verifies embedding functions on them with the 10-fold protocol
(``eval.metrics.protocol``)."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from config.config import ETHNICITIES, MAX_IMAGE_PIXELS
from eval.metrics.protocol import VerificationResult, pair_set_problem, verify
from eval.rfw.pairs import find_rfw_source, load_benchmarks, load_rfw
from utils.core.errors import InvalidInputError
from utils.data.inference import Inference, overlapped

EmbedFn = Callable[[torch.Tensor], torch.Tensor]


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
    inference: Inference = Inference(),
) -> ImageOutputs:
    """Outputs of ``embed_fn`` for uint8 RGB images ``[2N, 3, S, S]`` (and their horizontal flips), on the CPU.
    ``embed_fn`` receives batches already scaled to ``[-1, 1]`` on ``device``, and runs under ``inference``'s
    autocast."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images [N, 3, S, S], got {tuple(images.shape)} {images.dtype}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if images.shape[0] == 0:
        raise ValueError("no images to embed")
    device = torch.device(device)

    def forwards() -> Iterator[tuple[int, torch.Tensor]]:
        for start in range(0, images.shape[0], batch_size):
            batch = inference.inputs(images[start:start + batch_size], device)
            views = [batch, torch.flip(batch, dims=[3])] if flip else [batch]
            yield start, torch.stack([embed_fn(view).float() for view in views])

    with torch.inference_mode(), inference.autocast(device):
        outputs = [output for _, output in overlapped(forwards())]
    return ImageOutputs(torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs]) if flip else None)


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
        max_pixels: int = MAX_IMAGE_PIXELS,
        inference: Inference = Inference(),
    ) -> None:
        clash = set(val_targets) & set(ethnicities)
        if clash:
            raise InvalidInputError(f"val_targets {sorted(clash)} clash with RFW ethnicity names")
        self.rfw_root = Path(rfw_root)
        self.input_size = input_size
        self.batch_size = batch_size
        self.nfolds = nfolds
        self.inference = inference
        self.data = load_rfw(self.rfw_root, input_size, ethnicities=tuple(ethnicities), allow_resize=allow_resize,
                             max_pixels=max_pixels)
        for eth, (_, issame) in self.data.items():
            problem = pair_set_problem(issame, nfolds)
            if problem is not None:
                raise InvalidInputError(f"{find_rfw_source(self.rfw_root, eth).path} ({eth}): {problem}")
        self.data.update(load_benchmarks(val_root, list(val_targets), input_size, allow_resize, max_pixels))

    def outputs(self, embed_fn: EmbedFn, device: str | torch.device = "cpu") -> dict[str, ImageOutputs]:
        """The raw outputs (with flip TTA) of every pair set's images, by name."""
        return {name: image_outputs(embed_fn, images, batch_size=self.batch_size, device=device, flip=True,
                                    inference=self.inference)
                for name, (images, _) in self.data.items()}

    def verify_outputs(self, outputs: dict[str, ImageOutputs]) -> dict[str, VerificationResult]:
        return {name: verify(outputs[name].embeddings(), issame, self.nfolds)
                for name, (_, issame) in self.data.items()}

    def __call__(self, embed_fn: EmbedFn, device: str | torch.device = "cpu") -> dict[str, VerificationResult]:
        return self.verify_outputs(self.outputs(embed_fn, device))

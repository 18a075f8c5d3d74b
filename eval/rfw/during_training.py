"""The per-epoch RFW verification a training stage runs for best-epoch selection.

The stage scripts build it from the config and hand it to the stages (``TrainingTask.evaluate``), so neither the
stages nor the training loop import evaluation code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from config.config import ETHNICITIES, Config
from eval.metrics.bootstrap import bootstrap_fairness
from eval.metrics.fairness import fairness_metrics
from eval.rfw.embedding import RFWEvaluator, backbone_embed_fn
from utils.core.errors import MissingInputError
from utils.data.inference import Inference


def summarize_verification(results: Mapping[str, object], n_resamples: int = 1000, seed: int = 0,
                           confidence: float = 0.95) -> dict[str, float]:
    """Accuracy (%) of every pair set plus the fairness summary of the RFW ethnicities, from
    ``{name: VerificationResult}`` (ethnicities and ``val_targets`` benchmarks), the RFW keys each with its
    bootstrap interval as ``<key>_low`` / ``<key>_high`` (eval/metrics/bootstrap.py; the defaults are the config's)."""
    summary = {name: 100.0 * float(result.accuracy)  # type: ignore[attr-defined]
               for name, result in results.items()}
    rfw = [eth for eth in results if eth in ETHNICITIES]
    summary.update(fairness_metrics({eth: summary[eth] for eth in rfw}))
    pairs = {eth: (results[eth].distances, results[eth].issame) for eth in rfw}  # type: ignore[attr-defined]
    for key, estimate in bootstrap_fairness(pairs, n_resamples, seed, confidence).items():
        summary[f"{key}_low"], summary[f"{key}_high"] = estimate.low, estimate.high
    return summary



def epoch_evaluator(cfg: Config, device: torch.device) -> Callable[[nn.Module], Mapping[str, float]] | None:
    """Per-epoch RFW verification of a backbone (flip TTA) summarised with the config's bootstrap settings, or
    None when no RFW root is configured."""
    if cfg.rfw_root is None:
        return None
    rfw_root = Path(cfg.rfw_root)
    if not rfw_root.is_dir():
        raise MissingInputError(f"rfw_root {rfw_root} is not a folder (expected <Ethnicity>_test.bin files or the "
                                "RFW archive)")
    evaluator = RFWEvaluator(rfw_root, cfg.input_size, batch_size=cfg.extract_batch_size,
                             allow_resize=cfg.allow_resize, val_root=cfg.val_root, val_targets=cfg.val_targets,
                             max_pixels=cfg.max_image_pixels, inference=Inference(cfg.amp, cfg.channels_last))
    return lambda model: summarize_verification(evaluator(backbone_embed_fn(model), device), cfg.bootstrap_resamples,
                                                cfg.bootstrap_seed, cfg.confidence)

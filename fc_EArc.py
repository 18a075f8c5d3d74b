"""Stage 4 (SL): train the single-Linear adaptor on the four teachers' stored embeddings, then write the KD
targets (L2-normalised outputs of the lowest-loss epoch for every training image) to the adaptor's run folder.

    python fc_EArc.py                                  # specialized teachers
    python fc_EArc.py teacher_set=baseline             # balanced baseline teachers
    torchrun --nproc_per_node=8 fc_EArc.py             # DDP; every rank then writes its share of the targets
"""
from __future__ import annotations

from pathlib import Path

from utils.core.signals import record_stop_signals

if __name__ == "__main__":
    record_stop_signals()  # before the imports below (seconds): a signal during them ends it with exit 75

from config.config import Config  # noqa: E402
from utils.core.distributed import DistInfo  # noqa: E402
from utils.core.errors import InvalidInputError  # noqa: E402
from utils.stages.adaptor import run_adaptor_stage  # noqa: E402
from utils.stages.cli import run_stage  # noqa: E402


def main(cfg: Config, info: DistInfo) -> Path | None:
    if cfg.adaptor != "SL":
        raise InvalidInputError(f"fc_EArc.py trains the SL adaptor, got adaptor={cfg.adaptor}; use "
                         "dual_layer_EAF-Fusion.py has_drop_out=False (DuL) or has_drop_out=True (DLDPO)")
    return run_adaptor_stage(cfg, info)


if __name__ == "__main__":
    run_stage(main, adaptor="SL")

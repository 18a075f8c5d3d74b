"""Stage 4 (DuL / DLDPO): train a two-layer adaptor on the four teachers' stored embeddings, then write the
KD targets (L2-normalised outputs of the lowest-loss epoch for every training image) to the adaptor's run folder.

    python dual_layer_EAF-Fusion.py has_drop_out=False                  # DuL
    python dual_layer_EAF-Fusion.py has_drop_out=True                   # DLDPO (dropout 0.2 between layers)
    python dual_layer_EAF-Fusion.py has_drop_out=True teacher_set=baseline
    torchrun --nproc_per_node=8 dual_layer_EAF-Fusion.py has_drop_out=True

The variant follows the release's switch ``has_drop_out`` (``adaptor=DLDPO`` selects DLDPO as well); the
``adaptor`` key is set accordingly, so outputs land in ``.../DuL`` or ``.../DLDPO``.
"""
from __future__ import annotations

from pathlib import Path

from utils.core.signals import record_stop_signals

if __name__ == "__main__":
    record_stop_signals()  # before the imports below (seconds): a signal during them ends it with exit 75

from config.config import Config  # noqa: E402
from utils.core.distributed import DistInfo  # noqa: E402
from utils.stages.adaptor import run_adaptor_stage  # noqa: E402
from utils.stages.cli import run_stage  # noqa: E402


def main(cfg: Config, info: DistInfo) -> Path | None:
    cfg.adaptor = "DLDPO" if cfg.has_drop_out or cfg.adaptor == "DLDPO" else "DuL"
    cfg.has_drop_out = cfg.adaptor == "DLDPO"
    return run_adaptor_stage(cfg, info)


if __name__ == "__main__":
    run_stage(main)

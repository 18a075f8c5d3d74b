"""Stage 3: embed every training image with trained teachers into the embedding store.

    python extract_all.py ethnicity=Asian                        # one specialized teacher
    python extract_all.py ethnicity=all                          # the four specialized teachers in turn
    python extract_all.py teacher_set=baseline split=1           # one balanced baseline teacher
    python extract_all.py teacher_set=baseline ethnicity=all     # the four baseline teachers
    torchrun --nproc_per_node=8 extract_all.py ethnicity=all     # every rank embeds its own rows

Rows are L2-normalised eval-mode embeddings of the unflipped images (``extract_flipped=True`` adds the
flipped ones) in the order of the store's image index (``artifacts.store_dir``). A store already complete for the same
index and checkpoint is skipped; an interrupted one is redone.
"""
from __future__ import annotations

from utils.core.signals import record_stop_signals

if __name__ == "__main__":
    record_stop_signals()  # before the imports below (seconds): a signal during them ends it with exit 75

from config.config import Config  # noqa: E402
from utils.core.distributed import DistInfo  # noqa: E402
from utils.core.locks import rank0_folder_lock  # noqa: E402
from utils.core.logs import setup_logging  # noqa: E402
from utils.stages.cli import run_stage  # noqa: E402
from utils.stages.extract import (  # noqa: E402
    check_index_images, extract_teacher, extraction_members, plan_extraction, prepare_index, teacher_checkpoint
)
from utils.workdir import artifacts  # noqa: E402


def main(cfg: Config, info: DistInfo) -> list[str]:
    """Extract the configured teachers; returns the members whose stores were (re)written."""
    setup_logging(None, info.is_main)
    # Check every teacher before embedding anything, so a missing one fails in seconds, not hours.
    checkpoints = {member: teacher_checkpoint(cfg, member) for member in extraction_members(cfg)}
    with rank0_folder_lock(artifacts.store_dir(cfg), info.is_main, what="embedding store"):
        index = prepare_index(cfg, info)
        plans = plan_extraction(cfg, checkpoints, index, info)
        # Decoding a million images takes minutes: only worth it when some store will be written from them.
        if any(plan.problem is not None for plan in plans):
            check_index_images(cfg, index, info)
        return [plan.member for plan in plans if extract_teacher(cfg, plan, index, info)]


if __name__ == "__main__":
    run_stage(main)

"""Entry point shared by the stage scripts: config from argv, process group, and the two kinds of errors.

A :class:`~utils.core.errors.UserError` (bad key or value, missing input, a folder of another configuration) is
reported in one line and exits with code 2; every other exception (a bug, CUDA out of memory, NCCL) keeps
its traceback.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

from config.config import Config, parse_cli
from utils.core.distributed import DistInfo, cleanup_distributed, init_distributed
from utils.core.errors import EXIT_CODE, InvalidInputError, UserError
from utils.core.signals import INTERRUPTED_EXIT_CODE, TrainingInterrupted, startup_done
from utils.train.sampling import seed_everything


def _parse(argv: Sequence[str] | None, stage_defaults: dict[str, Any]) -> Config:
    try:
        return parse_cli(argv, **stage_defaults)
    except (KeyError, ValueError) as exc:  # config/ imports nothing of ours, so it raises the builtins
        raise InvalidInputError(exc.args[0] if exc.args else str(exc)) from None


def run_stage(main: Callable[[Config, DistInfo], Any], argv: Sequence[str] | None = None,
              **stage_defaults: Any) -> Any:
    """Parse ``key=value`` overrides, join the process group, run ``main`` and always leave the group.

    Called with ``argv`` (tests, tools), exceptions propagate unchanged; as a script, a user error ends
    the process with its one-line message and exit code 2, a stop signal with exit code 75 (the script called
    ``record_stop_signals`` first: a signal during its start-up ends it at once, later ones resumably).
    """
    rank = 0
    try:
        cfg = _parse(argv, stage_defaults)
        info = init_distributed()
        rank = info.rank
        # Same seed on every rank: models start identical before DDP, and reruns start from the same weights.
        seed_everything(cfg.seed)
        startup_done()  # from here a stop signal is recorded and the work ends resumably
        try:
            return main(cfg, info)
        finally:
            cleanup_distributed()
    except (TrainingInterrupted, UserError) as exc:
        if argv is not None:
            raise
        interrupted = isinstance(exc, TrainingInterrupted)
        print(f"{'interrupted' if interrupted else 'error'} (rank {rank}): {exc}", file=sys.stderr)
        raise SystemExit(INTERRUPTED_EXIT_CODE if interrupted else EXIT_CODE) from None

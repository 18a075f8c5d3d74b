"""Entry point shared by the stage scripts: config from argv, process group, clean errors."""
from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

from config.config import Config, parse_cli
from utils.distributed import DistInfo, cleanup_distributed, init_distributed
from utils.engine import seed_everything
from utils.signals import INTERRUPTED_EXIT_CODE, TrainingInterrupted

# Errors a user can fix (missing file, bad key or value); they are reported in one line, without a traceback.
USER_ERRORS = (OSError, KeyError, ValueError, RuntimeError)


def run_stage(main: Callable[[Config, DistInfo], Any], argv: Sequence[str] | None = None,
              **stage_defaults: Any) -> Any:
    """Parse ``key=value`` overrides, join the process group, run ``main`` and always leave the group."""
    try:
        cfg = parse_cli(argv, **stage_defaults)
    except (KeyError, ValueError) as exc:
        raise SystemExit(f"error: {exc.args[0] if exc.args else exc}") from None
    info = init_distributed()
    # Same seed on every rank: models start identical before DDP, and reruns start from the same weights.
    seed_everything(cfg.seed)
    try:
        return main(cfg, info)
    except TrainingInterrupted as exc:
        if argv is not None:
            raise
        print(f"interrupted (rank {info.rank}): {exc}", file=sys.stderr)
        raise SystemExit(INTERRUPTED_EXIT_CODE) from None
    except USER_ERRORS as exc:
        if argv is not None:  # called from Python (tests, the pipeline): keep the exception
            raise
        print(f"error (rank {info.rank}): {exc.args[0] if len(exc.args) == 1 else exc}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        cleanup_distributed()

"""Entry point shared by the stage scripts and the ``eval.*`` tools: config from argv, process group, and the two
kinds of errors.

A :class:`~utils.core.errors.UserError` (bad key or value, missing input, a folder of another configuration) is
reported in one line and exits with code 2; every other exception (a bug, CUDA out of memory, NCCL) keeps
its traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Sequence, TypeVar

from backbones import BACKBONES
from config.config import MAX_IMAGE_PIXELS, Config, parse_cli
from utils.core.distributed import DistInfo, cleanup_distributed, init_distributed
from utils.core.errors import EXIT_CODE, InvalidInputError, UserError
from utils.core.signals import INTERRUPTED_EXIT_CODE, TrainingInterrupted, startup_done
from utils.train.sampling import seed_everything

T = TypeVar("T")


def check_networks(cfg: Config) -> Config:
    """Refuse a network name the registry does not know before any data is read (a name also becomes part of
    run folder names, so ``network=../../x`` must never reach them)."""
    for key in ("network", "student_network"):
        name = getattr(cfg, key)
        if name not in BACKBONES:
            raise InvalidInputError(f"config key {key}={name!r} is not one of {', '.join(BACKBONES)}")
    return cfg


def _parse(argv: Sequence[str] | None, stage_defaults: dict[str, Any]) -> Config:
    try:
        cfg = parse_cli(argv, **stage_defaults)
    except (KeyError, ValueError) as exc:  # config/ imports nothing of ours, so it raises the builtins
        raise InvalidInputError(exc.args[0] if exc.args else str(exc)) from None
    return check_networks(cfg)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: give a number >= 1")
    return value


def add_max_image_pixels(parser: argparse.ArgumentParser) -> None:
    """``--max-image-pixels N`` of the tools that decode images: the config key ``max_image_pixels`` of the stages."""
    parser.add_argument("--max-image-pixels", type=_positive_int, default=MAX_IMAGE_PIXELS, metavar="N",
                        help="refuse images whose header claims more pixels, before decoding them (a decompression "
                             f"bomb); default {MAX_IMAGE_PIXELS:,}")


def one_line(exc: BaseException) -> str:
    """The message of a user error in one line. An error raised in a DataLoader worker arrives wrapped in the
    worker's traceback text; its own message is that text's last line, after the exception's name."""
    text = str(exc)
    if "\nOriginal Traceback" in text:
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return text


def run_tool(main: Callable[[], T]) -> T:
    """The error contract of the ``python -m eval.*`` tools, the same as the stage scripts': a user error is one
    line ``error: ...`` on stderr and exit code 2; anything else keeps its traceback."""
    try:
        return main()
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        raise SystemExit(EXIT_CODE) from None


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
        print(f"{'interrupted' if interrupted else 'error'} (rank {rank}): {one_line(exc)}", file=sys.stderr)
        raise SystemExit(INTERRUPTED_EXIT_CODE if interrupted else EXIT_CODE) from None

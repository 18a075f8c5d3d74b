"""Stage 1: split each ethnicity's identities into 4 near-equal random parts; part k of every
ethnicity forms balanced baseline teacher k.

    python baseline_data_split.py data_root=/data/BUPT [seed=0] [split_materialize=True] [split_overwrite=True]

Writes the split manifest (JSON, ``artifacts.split_manifest``); train.py with teacher_set=baseline reads it.
An existing manifest holding a different split is kept unless split_overwrite=True (or replace=True). split_materialize=True also builds
<output_root>/splits/split<k>/<Ethnicity>/<identity>/ trees of hard links (symlinks as fallback).
"""
from __future__ import annotations

from pathlib import Path

from utils.core.signals import record_stop_signals

if __name__ == "__main__":
    record_stop_signals()  # before the imports below (seconds): a signal during them ends it with exit 75

from config.config import ETHNICITIES, NUM_BASELINE_SPLITS, Config  # noqa: E402
from utils.core.distributed import DistInfo  # noqa: E402
from utils.core.errors import ExistingOutputError  # noqa: E402
from utils.core.io import atomic_write_json  # noqa: E402
from utils.core.logs import setup_logging  # noqa: E402
from utils.data.splits import (  # noqa: E402
    load_split_manifest, make_baseline_split, materialize_split, save_split_manifest
)
from utils.stages.cli import run_stage  # noqa: E402
from utils.workdir import artifacts  # noqa: E402
from utils.workdir.inputs import load_index  # noqa: E402
from utils.workdir.provenance import identities_fingerprint, split_record  # noqa: E402


def main(cfg: Config, info: DistInfo) -> Path:
    log = setup_logging(None, info.is_main)
    index = load_index(cfg)
    by_ethnicity: dict[str, list[str]] = {eth: [] for eth in ETHNICITIES}
    for eth, identity in index.identities:
        if eth not in by_ethnicity:
            raise ValueError(f"identity {identity} of {cfg.data_root} has no known ethnicity; "
                             "RecordIO data needs an ethnicity.tsv next to train.rec")
        by_ethnicity[eth].append(identity)
    splits = make_baseline_split(by_ethnicity, cfg.seed, parts=NUM_BASELINE_SPLITS)

    path = artifacts.split_manifest(cfg)
    if path.is_file() and load_split_manifest(path) == splits:
        log.info(f"{path} already holds this split (seed {cfg.seed}); unchanged")
    elif path.is_file() and not (cfg.split_overwrite or cfg.replace):
        raise ExistingOutputError(f"{path} holds a different split; pass split_overwrite=True to replace it")
    else:
        save_split_manifest(path, splits, seed=cfg.seed, source=str(cfg.data_root))
        atomic_write_json(artifacts.split_config_file(cfg), cfg.to_dict())
        log.info(f"wrote {path}")
    atomic_write_json(artifacts.split_provenance_file(cfg), split_record(cfg, identities_fingerprint(index)))
    for k, split in enumerate(splits):
        sizes = ", ".join(f"{eth} {len(split[eth])}" for eth in ETHNICITIES)
        log.info(f"split{k}: {sum(len(v) for v in split.values())} identities ({sizes})")

    if cfg.split_materialize:
        out_root = artifacts.splits_dir(cfg)
        made = materialize_split(index, splits, out_root)
        log.info(f"linked {made} images under {out_root}/split<k>/")
    return path


if __name__ == "__main__":
    run_stage(main)

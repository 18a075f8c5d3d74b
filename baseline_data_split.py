"""Stage 1: split each ethnicity's identities into 4 near-equal random parts; part k of every
ethnicity forms balanced baseline teacher k.

    python baseline_data_split.py data_root=/data/BUPT [seed=0] [split_materialize=True] [split_overwrite=True]

Writes cfg.split_manifest (JSON); train.py with teacher_set=baseline reads it. An existing manifest
holding a different split is kept unless split_overwrite=True. split_materialize=True also builds
<output_root>/splits/split<k>/<Ethnicity>/<identity>/ trees of hard links (symlinks as fallback).
"""
from __future__ import annotations

import logging
import sys

from config.config import ETHNICITIES, NUM_BASELINE_SPLITS, parse_cli
from utils.dataset import load_index
from utils.splits import load_split_manifest, make_baseline_split, materialize_split, save_split_manifest

log = logging.getLogger("baseline_data_split")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse_cli(argv)
    index = load_index(cfg)
    by_ethnicity: dict[str, list[str]] = {eth: [] for eth in ETHNICITIES}
    for eth, identity in index.identities:
        if eth not in by_ethnicity:
            raise SystemExit(f"identity {identity} of {cfg.data_root} has no known ethnicity; "
                             "RecordIO data needs an ethnicity.tsv next to train.rec")
        by_ethnicity[eth].append(identity)
    splits = make_baseline_split(by_ethnicity, cfg.seed, parts=NUM_BASELINE_SPLITS)

    path = cfg.split_manifest
    if path.is_file() and load_split_manifest(path) == splits:
        log.info("%s already holds this split (seed %d); unchanged", path, cfg.seed)
    elif path.is_file() and not cfg.split_overwrite:
        raise SystemExit(f"{path} holds a different split; pass split_overwrite=True to replace it")
    else:
        save_split_manifest(path, splits, seed=cfg.seed, source=str(cfg.data_root))
        log.info("wrote %s", path)
    for k, split in enumerate(splits):
        sizes = ", ".join(f"{eth} {len(split[eth])}" for eth in ETHNICITIES)
        log.info("split%d: %d identities (%s)", k, sum(len(v) for v in split.values()), sizes)

    if cfg.split_materialize:
        out_root = cfg.work_root / "splits"
        made = materialize_split(index, splits, out_root)
        log.info("linked %d images under %s/split<k>/", made, out_root)


if __name__ == "__main__":
    main(sys.argv[1:])

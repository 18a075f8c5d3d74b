"""Run a stage script's main under torchrun and save this rank's final model weights.

    torchrun --nproc-per-node=2 tests/rank_dump.py train.py DUMP_DIR key=value ...

Tests compare the per-rank files to prove that DDP keeps every rank's weights identical.
"""
import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from utils.stages.cli import run_stage  # noqa: E402

script, dump_dir, *overrides = sys.argv[1:]
spec = importlib.util.spec_from_file_location("stage", ROOT / script)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
result = run_stage(module.main, overrides)
Path(dump_dir).mkdir(parents=True, exist_ok=True)
torch.save(result.model.state_dict(), Path(dump_dir) / f"rank{os.environ.get('RANK', '0')}.pt")

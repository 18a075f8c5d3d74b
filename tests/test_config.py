"""The config contract: literal overrides, typo suggestions, derived values computed after overrides."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

from config.config import CONCAT_ORDER, load_config, parse_cli, teacher_members
from helpers import ROOT
from utils.workdir import artifacts


def test_defaults_are_the_papers():
    cfg = load_config()
    assert (cfg.network, cfg.embedding_size, cfg.batch_size, cfg.lr, cfg.lr_fc) == ("iresnet34", 512, 128, 0.1, 1.0)
    assert (cfg.num_epoch, cfg.milestones, cfg.num_epoch_fc, cfg.milestones_fc) == (52, [16, 28, 40, 50], 26, [16])
    assert cfg.margin_params() == {"s": 64.0, "m": 0.5, "std": 0.05}
    assert cfg.margin_params(adaptor_stage=True)["std"] == 0.0125
    assert (cfg.loss_lambda, cfg.momentum, cfg.weight_decay, cfg.grad_clip) == (10000.0, 0.9, 5e-4, 5.0)
    assert teacher_members("specialized") == list(CONCAT_ORDER) == ["Asian", "African", "Caucasian", "Indian"]
    # The release's block order of baseline teachers: split k is named after ETHNICITIES[k], then CONCAT_ORDER.
    assert teacher_members("baseline") == ["split1", "split0", "split2", "split3"]


def test_overrides_are_python_literals_and_bare_words_are_strings():
    cfg = load_config(["milestones=[3, 5]", "lr=1", "data_root=/data/BUPT", "resume=True", "dropout=None"])
    assert cfg.milestones == [3, 5] and cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.data_root == "/data/BUPT" and cfg.resume is True and cfg.dropout is None


def test_typo_names_the_closest_keys():
    with pytest.raises(KeyError, match="did you mean network"):
        load_config(["nework=iresnet34"])
    with pytest.raises(KeyError, match="did you mean network"):
        parse_cli(["nework=iresnet34"])
    with pytest.raises(ValueError, match="'iresnet34' is not of the form key=value"):
        parse_cli(["iresnet34"])
    with pytest.raises(ValueError, match="'iresnet34' is not of the form key=value"):
        load_config(["iresnet34"])


def test_bad_values_name_the_key():
    with pytest.raises(ValueError, match="teacher_set"):
        load_config(["teacher_set=balanced"])
    with pytest.raises(ValueError, match="milestones"):
        load_config(["milestones=[5, 2]"])
    with pytest.raises(ValueError, match="split"):
        load_config(["split=4"])


def test_derived_values_follow_overrides_and_world_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    cfg = load_config(["batch_size=64", "output_root=/runs", "teacher_set=baseline", "split=2"])
    assert cfg.scaled_lr == pytest.approx(0.1 / 512 * 64 * 8)
    assert cfg.scaled_lr_fc == pytest.approx(1.0 / 512 * 128 * 8)
    assert str(artifacts.teacher_dir(cfg)) == "/runs/teachers/baseline/iresnet34_split2"
    assert str(artifacts.student_dir(cfg)) == "/runs/students/baseline_iresnet34/SL_aKD_iresnet34"
    assert json.loads(json.dumps(cfg.to_dict()))["derived"]["world_size"] == 8


def test_stage_defaults_yield_to_the_user():
    assert parse_cli(["kd='EAFKD'"], kd="aKD").kd == "EAFKD"
    assert parse_cli([], kd="EAFKD").kd == "EAFKD"


def test_import_has_no_side_effects(tmp_path):
    code = "import config.config, os; print(sorted(os.listdir('.')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert importlib.reload(importlib.import_module("config.config")).Config().data_root is None


@pytest.mark.parametrize("key, value", [("network", "iresnet18"), ("rfw_root", "None"), ("milestones", [1, 2]),
                                        ("lr", 0.8), ("data_root", "/data/a b"), ("seed", 3)])
def test_format_override_round_trips(key, value):
    from config.config import format_override

    assert getattr(load_config([format_override(key, value)]), key) == value


def test_help_lists_every_key_with_its_comment(capsys):
    from config.config import Config

    with pytest.raises(SystemExit):
        parse_cli(["--help"])
    lines = capsys.readouterr().out.splitlines()[1:]
    assert len(lines) == len(Config.__dataclass_fields__)
    assert all(len(line.split(None, 1)) == 2 for line in lines), "a key is missing its one-line comment"

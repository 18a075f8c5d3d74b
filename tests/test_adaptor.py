"""Adaptor stages on stores extracted from tiny synthetic images with random-init teachers."""
from __future__ import annotations

import importlib.util
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import fc_EArc
from backbones import build_adaptor
from config.config import CONCAT_ORDER, load_config, merge_overrides
from helpers import fake_teacher_set, run_torchrun, tiny_overrides, write_fake_teacher
from utils.core.errors import ProvenanceError
from utils.core.weights import load_weights
from utils.stages.adaptor import ConcatStoreDataset, build_adaptor_task, passthrough_collate
from utils.stages.cli import run_stage
from utils.workdir import artifacts
from utils.workdir.artifacts import member_files, target_files
from utils.workdir.provenance import file_fingerprint
from utils.workdir.store import open_targets, open_teacher_stores

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("dual_layer_eaf_fusion", ROOT / "dual_layer_EAF-Fusion.py")
dual = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dual)




@pytest.fixture(scope="module")
def extracted(tiny_synthetic, tmp_path_factory) -> list[str]:
    """Overrides of a work folder holding four specialized teacher stores, with flipped rows."""
    import extract_all

    overrides = tiny_overrides(tiny_synthetic, tmp_path_factory.mktemp("adaptor"), batch_size_fc=16)
    fake_teacher_set(overrides)
    run_stage(extract_all.main, merge_overrides(overrides, ["ethnicity='all'", "extract_flipped=True"]))
    return overrides


def copy_work(overrides: list[str], dest: Path) -> list[str]:
    """The same stores in a fresh work folder, so a test can train without touching the shared one."""
    cfg = load_config(overrides)
    shutil.copytree(artifacts.work_root(cfg), dest)
    return merge_overrides(overrides, [f"output_root={str(dest)!r}"])


def expected_targets(cfg, stores, flipped: bool = False) -> np.ndarray:
    model = load_weights(build_adaptor(cfg), artifacts.adaptor_dir(cfg) / "best_adaptor.pth").eval()
    arrays = stores.flipped if flipped else stores.arrays
    with torch.no_grad():
        return F.normalize(model(torch.from_numpy(np.concatenate(arrays, axis=1))), dim=1).numpy()


def test_adaptor_input_is_the_concatenation_in_release_order(extracted):
    cfg = load_config(extracted)
    stores = open_teacher_stores(cfg)
    assert stores.members == list(CONCAT_ORDER) == ["Asian", "African", "Caucasian", "Indian"]
    rows = [5, 0, 17, 5]
    expected = np.stack([np.concatenate([np.load(member_files(artifacts.store_dir(cfg), m).array)[r] for m in CONCAT_ORDER])
                         for r in rows])
    memmapped = ConcatStoreDataset(stores.arrays, stores.index.labels, in_memory=False)
    for dataset in (ConcatStoreDataset(stores.arrays, stores.index.labels, in_memory=True), memmapped,
                    pickle.loads(pickle.dumps(memmapped))):
        features, labels, got_rows = dataset.__getitems__(rows)
        assert features.dtype == torch.float32 and features.shape == (4, 4 * cfg.embedding_size)
        np.testing.assert_array_equal(features.numpy(), expected)
        assert labels.tolist() == stores.index.labels[rows].tolist() and got_rows.tolist() == rows
        single, label, row = dataset[17]
        np.testing.assert_array_equal(single.numpy(), expected[2])
        assert (label, row) == (int(stores.index.labels[17]), 17)

    task = build_adaptor_task(cfg, stores)
    assert task.stage == "adaptor" and not task.flip and task.selection == "loss"
    assert task.header.num_classes == stores.index.num_classes == 24
    loader = DataLoader(task.dataset, batch_size=16, shuffle=True, collate_fn=passthrough_collate)
    features, labels, batch_rows = next(iter(loader))
    assert features.shape == (16, 4 * cfg.embedding_size)
    np.testing.assert_array_equal(features.numpy()[:, :cfg.embedding_size],
                                  stores.arrays[0][batch_rows.numpy()])


def test_adaptor_variants_have_the_documented_layers():
    cfg = load_config({"embedding_size": 64, "middle_layer_size": 32})
    sl = build_adaptor(cfg, "SL")
    assert [n for n, _ in sl.named_children()] == ["fc"]
    assert (sl.fc.in_features, sl.fc.out_features, sl.fc.bias is not None) == (256, 64, True)
    x = torch.randn(64, 256)
    for name, dropout in (("DuL", False), ("DLDPO", True)):
        model = build_adaptor(cfg, name)
        assert (model.fc1.in_features, model.fc1.out_features) == (256, 32)
        assert (model.fc2.in_features, model.fc2.out_features) == (32, 64)
        assert isinstance(model.act, nn.LeakyReLU) and model.act.negative_slope == 0.01
        assert isinstance(model.dropout, nn.Dropout) == dropout
        model.train()
        assert torch.equal(model(x), model(x)) != dropout  # dropout is random in train mode only
        model.eval()
        assert torch.equal(model(x), model(x))
        if dropout:
            assert model.dropout.p == 0.2


@pytest.mark.parametrize("name", ["SL", "DuL", "DLDPO"])
def test_released_style_state_dict_loads(name, tmp_path):
    cfg = load_config({"embedding_size": 64, "middle_layer_size": 32})
    generator = torch.Generator().manual_seed(0)
    shapes = {"fc.weight": (64, 256), "fc.bias": (64,)} if name == "SL" else {
        "fc1.weight": (32, 256), "fc1.bias": (32,), "fc2.weight": (64, 32), "fc2.bias": (64,),
        # Unused by the method, present in the authors' dual-layer files.
        "attention.in_proj_weight": (96, 32), "attention.in_proj_bias": (96,),
        "attention.out_proj.weight": (32, 32), "attention.out_proj.bias": (32,),
        "key_vector": (1, 32), "value_vector": (1, 32)}
    state = {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}
    torch.save(state, tmp_path / "released_adaptor.pth")
    model = load_weights(build_adaptor(cfg, name), tmp_path / "released_adaptor.pth").eval()
    x = torch.randn(3, 256, generator=generator)
    if name == "SL":
        expected = x @ state["fc.weight"].T + state["fc.bias"]
    else:
        hidden = F.leaky_relu(x @ state["fc1.weight"].T + state["fc1.bias"], 0.01)
        expected = hidden @ state["fc2.weight"].T + state["fc2.bias"]
    torch.testing.assert_close(model(x), expected)


@pytest.mark.float_sensitive
def test_sl_adaptor_learns_keeps_lowest_loss_epoch_and_writes_targets(extracted, tmp_path):
    overrides = merge_overrides(copy_work(extracted, tmp_path / "work"), ["num_epoch_fc=4", "milestones_fc=[4]"])
    target_path = run_stage(fc_EArc.main, overrides)
    cfg = load_config(overrides)
    run_dir = artifacts.adaptor_dir(cfg)
    assert target_path == target_files(run_dir).array and run_dir.name == "SL"
    epochs = json.loads((run_dir / "history.json").read_text())["epochs"]
    losses = [e["loss_sum"] for e in epochs]
    assert losses[-1] < 0.8 * losses[0]
    best = epochs[int(np.argmin(losses))]

    manifest = json.loads(target_files(run_dir).manifest.read_text())
    assert manifest["complete"] and manifest["flipped"] and manifest["adaptor"] == "SL"
    assert (manifest["best_epoch"], manifest["best_step"]) == (best["epoch"], best["global_step"])
    assert manifest["checkpoint"]["path"] == str((run_dir / "best_adaptor.pth").resolve())
    assert manifest["checkpoint"]["sha256"] == file_fingerprint(run_dir / "best_adaptor.pth")["sha256"]
    best_weights = torch.load(run_dir / "best_adaptor.pth", weights_only=True)
    epoch_weights = torch.load(run_dir / f"{best['global_step']}adaptor.pth", weights_only=True)
    assert all(torch.equal(best_weights[k], epoch_weights[k]) for k in epoch_weights)

    stores = open_teacher_stores(cfg)
    targets = open_targets(run_dir, stores.index.digest())
    flipped = open_targets(run_dir, stores.index.digest(), flipped=True)
    np.testing.assert_allclose(np.linalg.norm(targets, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(targets, expected_targets(cfg, stores), atol=1e-5)
    np.testing.assert_allclose(flipped, expected_targets(cfg, stores, flipped=True), atol=1e-5)

    # A finished run is not trained again; lost targets are rewritten from its best weights.
    stamps = {p: p.stat().st_mtime_ns for p in (run_dir / "history.json", target_files(run_dir).array)}
    run_stage(fc_EArc.main, overrides)
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in stamps.items())
    target_files(run_dir).manifest.write_text(json.dumps({**manifest, "complete": False}))
    run_stage(fc_EArc.main, overrides)
    assert (run_dir / "history.json").stat().st_mtime_ns == stamps[run_dir / "history.json"]
    assert json.loads(target_files(run_dir).manifest.read_text())["complete"]

    # New teacher weights make the stores (and so this run) stale: resuming it is refused.
    write_fake_teacher(cfg, "Indian", seed=11)
    with pytest.raises(RuntimeError, match="Indian: .*not the current one"):
        run_stage(fc_EArc.main, overrides)
    member_files(artifacts.store_dir(cfg), "Indian").manifest.unlink()
    with pytest.raises(RuntimeError, match="3 are usable"):
        run_stage(fc_EArc.main, overrides)


def test_adaptor_folder_of_other_settings_is_refused_or_moved_aside_and_logged_once(extracted, tmp_path):
    overrides = merge_overrides(copy_work(extracted, tmp_path / "work"), ["num_epoch_fc=1", "milestones_fc=[1]"])
    run_stage(fc_EArc.main, overrides)
    run_dir = artifacts.adaptor_dir(load_config(overrides))
    with pytest.raises(ProvenanceError, match="replace=True"):
        run_stage(fc_EArc.main, merge_overrides(overrides, ["lr_fc=0.5"]))
    run_stage(fc_EArc.main, merge_overrides(overrides, ["lr_fc=0.5", "replace=True"]))
    aside = list(run_dir.parent.glob(f"{run_dir.name}.replaced-*"))
    assert len(aside) == 1 and (aside[0] / "best_adaptor.pth").is_file()
    # The folder is claimed once, so the new run's log names where the old run went, once.
    assert artifacts.log_file(run_dir).read_text().count(f"moved to {aside[0]}") == 1


def test_dual_script_trains_dul_or_dldpo_from_has_drop_out(extracted, tmp_path):
    overrides = merge_overrides(copy_work(extracted, tmp_path / "work"), ["num_epoch_fc=1", "milestones_fc=[2]",
                                                           "middle_layer_size=32"])
    for flag, name in ((False, "DuL"), (True, "DLDPO")):
        path = run_stage(dual.main, merge_overrides(overrides, [f"has_drop_out={flag}"]))
        cfg = load_config(merge_overrides(overrides, [f"adaptor={name!r}"]))
        assert path == target_files(artifacts.adaptor_dir(cfg)).array
        saved = json.loads((artifacts.adaptor_dir(cfg) / "config.json").read_text())
        assert (saved["adaptor"], saved["has_drop_out"]) == (name, flag)
        weights = torch.load(artifacts.adaptor_dir(cfg) / "best_adaptor.pth", weights_only=True)
        assert sorted(weights) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
        stores = open_teacher_stores(cfg)
        np.testing.assert_allclose(open_targets(artifacts.adaptor_dir(cfg), stores.index.digest()),
                                   expected_targets(cfg, stores), atol=1e-5)
    with pytest.raises(ValueError, match="fc_EArc.py trains the SL adaptor"):
        run_stage(fc_EArc.main, merge_overrides(overrides, ["adaptor='DuL'"]))


def test_two_ranks_train_from_the_memory_map_and_write_every_target_row(extracted, tmp_path):
    overrides = merge_overrides(copy_work(extracted, tmp_path / "work"), ["num_epoch_fc=1", "milestones_fc=[2]",
                                                           "store_in_memory=False"])
    run_torchrun("fc_EArc.py", overrides)
    cfg = load_config(overrides)
    stores = open_teacher_stores(cfg)
    assert json.loads((artifacts.adaptor_dir(cfg) / "config.json").read_text())["derived"]["world_size"] == 2
    np.testing.assert_allclose(open_targets(artifacts.adaptor_dir(cfg), stores.index.digest()),
                               expected_targets(cfg, stores), atol=1e-5)

"""ONNX export of trained backbones: onnxruntime agrees with PyTorch; malformed weights are refused."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from backbones import get_backbone
from config.config import load_config
from eval import export

SIZE, EMBEDDING = 32, 64


def _run_dir(tmp_path: Path, data: Path, network: str) -> Path:
    """A student run folder as training leaves it: config.json (stage student) and best_backbone.pth."""
    cfg = load_config({"student_network": network, "input_size": SIZE, "embedding_size": EMBEDDING, "width": 8,
                       "data_root": str(data / "train")})
    run_dir = tmp_path / "students" / f"SL_aKD_{network}"
    run_dir.mkdir(parents=True)
    data_dict = cfg.to_dict()
    data_dict["derived"]["stage"] = "student"
    (run_dir / "config.json").write_text(json.dumps(data_dict))
    torch.manual_seed(0)
    model = get_backbone(network, input_size=SIZE, embedding_size=EMBEDDING, width=8)
    # Non-trivial BatchNorm statistics, as after training, so the raw embeddings are not near zero.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    torch.save(model.state_dict(), run_dir / "best_backbone.pth")
    return run_dir


@pytest.mark.parametrize("network", ["iresnet18", "mobilefacenet"])
def test_export_matches_pytorch_on_random_and_real_images(tiny_synthetic, tmp_path, network):
    weights = _run_dir(tmp_path, tiny_synthetic, network) / "best_backbone.pth"
    out = tmp_path / "model.onnx"
    record = export.main(["--weights", str(weights), "--out", str(out), "--num-images", "6"])
    assert json.loads(out.with_name("model.onnx.json").read_text()) == record
    assert record["source_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert record["architecture"]["network"] == network
    # The check ran on random and on real images of the run's data_root, within the tolerance.
    assert record["check"]["real"]["images"] == 6 and record["check"]["random"]["images"] == 5
    assert max(record["check"][k]["max_abs_diff_normalised"] for k in ("random", "real")) <= 1e-4
    # The batch axis is dynamic: one image and seven images both run, and agree with PyTorch.
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    model = get_backbone(network, input_size=SIZE, embedding_size=EMBEDDING, width=8)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    for batch in (1, 7):
        images = torch.rand(batch, 3, SIZE, SIZE) * 2 - 1
        onnx_out = session.run(["embeddings"], {"images": images.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(onnx_out, model(images).numpy(), rtol=1e-4, atol=1e-5)


def test_malformed_weights_are_refused(tiny_synthetic, tmp_path, capsys):
    run_dir = _run_dir(tmp_path, tiny_synthetic, "mobilefacenet")
    weights = run_dir / "best_backbone.pth"
    out = tmp_path / "model.onnx"
    weights.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as refused:
        export.main(["--weights", str(weights), "--out", str(out)])
    assert refused.value.code == 2 and "cannot read mobilefacenet backbone weights file" in capsys.readouterr().err
    torch.save(get_backbone("iresnet18", input_size=SIZE, embedding_size=EMBEDDING, width=8).state_dict(), weights)
    with pytest.raises(SystemExit) as refused:
        export.main(["--weights", str(weights), "--out", str(out)])
    assert refused.value.code == 2 and "do not match MobileFaceNet" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("*.onnx*"))

"""Backbones, adaptors and strict weight loading."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backbones import build_adaptor, build_backbone, get_adaptor, get_backbone
from config.config import load_config
from utils.core.weights import load_weights

IRESNET_PARAMS = {
    "iresnet18": 24_025_600,
    "iresnet34": 34_139_328,
    "iresnet50": 43_590_848,
    "iresnet100": 65_156_160,
}
IRESNET_BLOCKS = {"iresnet18": (2, 2, 2, 2), "iresnet34": (3, 4, 6, 3)}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: int) -> int:
    """Multiply-accumulates of one image through every Conv2d and Linear (forward hooks)."""
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output[0].numel() * (module.in_channels // module.groups) * kh * kw
        else:
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, input_size, input_size))
    for handle in handles:
        handle.remove()
    return total


@pytest.mark.parametrize("name", list(IRESNET_PARAMS))
def test_iresnet_param_count_and_frozen_feature_scale(name):
    model = get_backbone(name)
    assert count_params(model) == IRESNET_PARAMS[name]
    assert not model.features.weight.requires_grad
    assert torch.all(model.features.weight == 1.0)
    assert model.features.eps == 1e-5
    assert model.fc.in_features == 512 * 7 * 7


def test_default_dropout_per_network():
    assert get_backbone("iresnet50", width=8).dropout.p == 0.4
    assert get_backbone("iresnet50", width=8, dropout=0.0).dropout.p == 0.0
    assert get_backbone("iresnet34", width=8).dropout.p == 0.0
    assert get_backbone("mobilefacenet", width=8).dropout.p == 0.0


@pytest.mark.parametrize(
    "name,size,width",
    [
        ("iresnet18", 112, 64),
        ("iresnet18", 32, 64),
        ("iresnet34", 32, 16),
        ("iresnet50", 32, 16),
        ("iresnet100", 32, 8),
        ("mobilefacenet", 112, 64),
        ("mobilefacenet", 32, 64),
        ("mbf", 112, 64),
        ("mbf", 32, 64),
    ],
)
def test_backbone_maps_images_to_embeddings(name, size, width):
    torch.manual_seed(0)
    model = get_backbone(name, input_size=size, width=width).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 512)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])


def test_iresnet_se_blocks_and_training_step():
    torch.manual_seed(0)
    model = get_backbone("iresnet18", input_size=32, width=16, use_se=True, embedding_size=64)
    assert "layer1.0.se_block.fc1.weight" in model.state_dict()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(torch.randn(4, 3, 32, 32)).pow(2).mean()
    loss.backward()
    opt.step()
    assert model.features.weight.grad is None
    assert torch.all(model.features.weight == 1.0)


@pytest.mark.parametrize("name,params,gmacs", [("mobilefacenet", 1.20e6, 0.22), ("mbf", 2.06e6, 0.44)])
def test_mobilefacenet_size_and_compute(name, params, gmacs):
    model = get_backbone(name)
    assert abs(count_params(model) - params) / params < 0.02
    assert abs(count_macs(model, 112) / 1e9 - gmacs) / gmacs < 0.10


def test_mac_counter_on_a_known_layer():
    # 3x3 conv 3->8 on 16x16 (stride 1, pad 1): 16*16*8 outputs x 27 MACs; Linear 4->5: 20.
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    assert count_macs(model, 16) == 16 * 16 * 8 * 27 + 8 * 5


def _bn(prefix: str, c: int) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.weight": torch.rand(c),
        f"{prefix}.bias": torch.rand(c),
        f"{prefix}.running_mean": torch.rand(c),
        f"{prefix}.running_var": torch.rand(c) + 0.5,
        f"{prefix}.num_batches_tracked": torch.tensor(7),
    }


def release_iresnet_state(blocks: tuple[int, ...], width: int, emb: int, side: int, se: bool) -> dict:
    """A state_dict written from the release's naming scheme, independently of the model code."""
    widths = [width, 2 * width, 4 * width, 8 * width]
    state = {"conv1.weight": torch.randn(width, 3, 3, 3), "prelu.weight": torch.rand(width)}
    state.update(_bn("bn1", width))
    inplanes = width
    for li, (planes, depth) in enumerate(zip(widths, blocks), start=1):
        for bi in range(depth):
            p = f"layer{li}.{bi}"
            cin = inplanes if bi == 0 else planes
            state.update(_bn(f"{p}.bn1", cin))
            state[f"{p}.conv1.weight"] = torch.randn(planes, cin, 3, 3)
            state.update(_bn(f"{p}.bn2", planes))
            state[f"{p}.prelu.weight"] = torch.rand(planes)
            state[f"{p}.conv2.weight"] = torch.randn(planes, planes, 3, 3)
            state.update(_bn(f"{p}.bn3", planes))
            if se:
                state[f"{p}.se_block.fc1.weight"] = torch.randn(max(1, planes // 16), planes, 1, 1)
                state[f"{p}.se_block.fc2.weight"] = torch.randn(planes, max(1, planes // 16), 1, 1)
            if bi == 0:
                state[f"{p}.downsample.0.weight"] = torch.randn(planes, cin, 1, 1)
                state.update(_bn(f"{p}.downsample.1", planes))
        inplanes = planes
    state.update(_bn("bn2", inplanes))
    state["fc.weight"] = torch.randn(emb, inplanes * side * side)
    state["fc.bias"] = torch.randn(emb)
    state.update(_bn("features", emb))
    state["features.weight"] = torch.ones(emb)
    return state


@pytest.mark.parametrize("name,se", [("iresnet18", False), ("iresnet34", True)])
def test_release_key_names_load_strict(name, se, tmp_path):
    state = release_iresnet_state(IRESNET_BLOCKS[name], width=16, emb=32, side=2, se=se)
    model = get_backbone(name, input_size=32, width=16, embedding_size=32, use_se=se)
    model.load_state_dict(state, strict=True)
    path = tmp_path / "backbone.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)  # as saved from a DDP-wrapped model
    fresh = get_backbone(name, input_size=32, width=16, embedding_size=32, use_se=se)
    assert load_weights(fresh, path) is fresh
    for key, value in state.items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_load_weights_reports_every_kind_of_mismatch(tmp_path):
    model = get_backbone("iresnet18", input_size=32, width=8, embedding_size=16)
    state = dict(model.state_dict())
    del state["layer2.0.conv1.weight"]
    state["layer9.extra"] = torch.zeros(1)
    state["fc.bias"] = torch.zeros(17)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError) as info:
        load_weights(model, path, what="teacher weights")
    text = str(info.value)
    names = ("layer2.0.conv1.weight", "layer9.extra", "fc.bias", "(17,)", "(16,)")
    for fragment in (str(path), "teacher weights", *names):
        assert fragment in text
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_weights(model, tmp_path / "missing.pth")


def test_load_weights_tolerates_missing_batch_counters():
    source = get_backbone("iresnet18", input_size=32, width=8, embedding_size=16)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    target = load_weights(get_backbone("iresnet18", input_size=32, width=8, embedding_size=16), state)
    assert torch.equal(target.fc.weight, source.fc.weight)


def release_adaptor_state(middle: int = 8) -> dict[str, torch.Tensor]:
    return {
        "fc1.weight": torch.randn(middle, 12),
        "fc1.bias": torch.randn(middle),
        "fc2.weight": torch.randn(4, middle),
        "fc2.bias": torch.randn(4),
        "attention.in_proj_weight": torch.randn(3 * middle, middle),
        "attention.out_proj.weight": torch.randn(middle, middle),
        "key_vector": torch.randn(1, middle),
        "value_vector.weight": torch.randn(middle, middle),
    }


@pytest.mark.parametrize("name", ["DuL", "DLDPO"])
def test_dual_adaptor_loads_release_state_and_rejects_wrong_keys(name, tmp_path):
    state = release_adaptor_state()
    path = tmp_path / "adaptor.pth"
    torch.save(state, path)
    model = get_adaptor(name, in_features=12, embedding_size=4, middle_layer_size=8)
    load_weights(model, path)
    assert torch.equal(model.fc1.weight, state["fc1.weight"])
    assert torch.equal(model.fc2.bias, state["fc2.bias"])
    state["fc3.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="fc3.weight"):
        load_weights(model, state)


def test_sl_adaptor_is_one_linear():
    model = get_adaptor("SL", in_features=12, embedding_size=4)
    assert set(model.state_dict()) == {"fc.weight", "fc.bias"}
    x = torch.randn(3, 12)
    assert torch.allclose(model(x), x @ model.fc.weight.T + model.fc.bias)


def test_dldpo_dropout_only_in_training_and_layer_order():
    torch.manual_seed(0)
    sizes = {"in_features": 12, "embedding_size": 4, "middle_layer_size": 64}
    dldpo = get_adaptor("DLDPO", **sizes, dropout=0.5, negative_slope=0.1)
    x = torch.randn(5, 12)

    def manual(drop: bool) -> torch.Tensor:
        hidden = F.dropout(dldpo.fc1(x), p=0.5, training=drop)
        return dldpo.fc2(F.leaky_relu(hidden, 0.1))

    dldpo.train()
    torch.manual_seed(1)
    first = dldpo(x)
    torch.manual_seed(1)
    assert torch.allclose(first, manual(True))
    assert not torch.allclose(first, dldpo(x))
    dldpo.eval()
    assert torch.allclose(dldpo(x), manual(False))
    assert torch.equal(dldpo(x), dldpo(x))

    dul = get_adaptor("DuL", **sizes, dropout=0.5, negative_slope=0.1)
    dul.train()
    expected = dul.fc2(F.leaky_relu(dul.fc1(x), 0.1))
    assert torch.allclose(dul(x), expected)
    assert not any(isinstance(m, nn.Dropout) for m in dul.modules())


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError) as info:
        get_backbone("resnet9000")
    for name in ("iresnet18", "iresnet34", "iresnet50", "iresnet100", "mobilefacenet", "mbf"):
        assert name in str(info.value)
    with pytest.raises(ValueError, match="SL, DuL, DLDPO"):
        get_adaptor("Triple")


def test_builders_read_the_config():
    cfg = load_config({"network": "iresnet18", "student_network": "mbf", "width": 8, "input_size": 32,
                       "embedding_size": 16, "adaptor": "DLDPO", "middle_layer_size": 24, "adaptor_dropout": 0.3,
                       "adaptor_negative_slope": 0.2})
    teacher = build_backbone(cfg)
    student = build_backbone(cfg, student=True)
    assert teacher.fc.in_features == 8 * 8 * 2 * 2 and teacher.fc.out_features == 16
    assert student.features.num_features == 16 and student.fc.in_features == 64
    adaptor = build_adaptor(cfg)
    assert (adaptor.fc1.in_features, adaptor.fc1.out_features, adaptor.fc2.out_features) == (64, 24, 16)
    assert adaptor.dropout.p == 0.3 and adaptor.act.negative_slope == 0.2
    assert list(build_adaptor(cfg, name="SL").state_dict()) == ["fc.weight", "fc.bias"]

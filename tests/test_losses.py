"""Margin heads: the maths is checked against independent float64 computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from config.config import MARGIN_DEFAULTS, load_config
from utils.train.heads import HEADS, build_head, cos_plus_margin, get_head

E, C = 8, 50


def make_batch(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, E, generator=g), torch.randint(0, C, (n,), generator=g)


def cosines(head, emb: torch.Tensor) -> np.ndarray:
    x = emb.double().numpy()
    w = head.kernel.detach().double().numpy()
    return (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=0, keepdims=True))


def recovered_arc_margins(head, emb, labels, logits) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample margin read back from the target logit: acos(logit / s) - theta_y."""
    cos = cosines(head, emb)
    rows = np.arange(len(labels))
    target_cos = cos[rows, labels.numpy()]
    target_logit = logits.detach().double().numpy()[rows, labels.numpy()]
    return target_cos, np.arccos(np.clip(target_logit / head.s, -1, 1)) - np.arccos(target_cos)


def test_arcface_matches_independent_formula_and_eaf_with_zero_std():
    emb, labels = make_batch(32)
    torch.manual_seed(0)
    arc = get_head("ArcFace", E, C, s=64.0, m=0.5)
    eaf = get_head("ElasticArcFace", E, C, s=64.0, m=0.5, std=0.0)
    eaf.load_state_dict(arc.state_dict())
    logits = arc(emb, labels)
    cos = cosines(arc, emb)
    expected = 64.0 * cos
    rows = np.arange(32)
    expected[rows, labels.numpy()] = 64.0 * np.cos(np.arccos(cos[rows, labels.numpy()]) + 0.5)
    np.testing.assert_allclose(logits.detach().numpy(), expected, atol=2e-3)
    assert torch.equal(eaf(emb, labels), logits)


def test_cosface_matches_independent_formula():
    emb, labels = make_batch(32)
    head = get_head("CosFace", E, C, s=30.0, m=0.35)
    cos = cosines(head, emb)
    rows = np.arange(32)
    cos[rows, labels.numpy()] -= 0.35
    np.testing.assert_allclose(head(emb, labels).detach().numpy(), 30.0 * cos, atol=1e-3)


def test_elastic_arcface_margin_distribution_and_seeding():
    emb, labels = make_batch(20000, seed=1)
    head = get_head("ElasticArcFace", E, C, s=64.0, m=0.5, std=0.05)
    torch.manual_seed(123)
    logits = head(emb, labels)
    target_cos, margins = recovered_arc_margins(head, emb, labels, logits)
    # Keep samples whose theta + m stays well inside (0, pi), where the margin can be read back exactly.
    theta = np.arccos(target_cos)
    keep = (theta > 0.2) & (theta < math.pi - 0.9)
    assert keep.sum() > 15000
    assert abs(margins[keep].mean() - 0.5) < 0.002
    assert abs(margins[keep].std() - 0.05) < 0.002
    others = np.ones_like(logits.detach().numpy(), dtype=bool)
    others[np.arange(len(labels)), labels.numpy()] = False
    np.testing.assert_allclose(logits.detach().numpy()[others], 64.0 * cosines(head, emb)[others], atol=2e-3)
    torch.manual_seed(123)
    assert torch.equal(head(emb, labels), logits)
    assert not torch.equal(head(emb, labels), logits)


@pytest.mark.parametrize("name,std", [("ElasticArcFacePlus", 0.0175), ("ElasticCosFacePlus", 0.02)])
def test_plus_variants_give_harder_samples_larger_margins(name, std):
    n = 64
    emb, labels = make_batch(n, seed=2)
    head = get_head(name, E, C, s=64.0, m=0.4, std=std)
    torch.manual_seed(7)
    logits = head(emb, labels)
    torch.manual_seed(7)
    drawn = torch.normal(0.4, std, size=(n,)).double().numpy()
    if "Arc" in name:
        target_cos, margins = recovered_arc_margins(head, emb, labels, logits)
    else:
        target_cos = cosines(head, emb)[np.arange(n), labels.numpy()]
        margins = target_cos - logits.detach().double().numpy()[np.arange(n), labels.numpy()] / 64.0
    hardest_first = np.argsort(target_cos)
    np.testing.assert_allclose(margins[hardest_first], np.sort(drawn)[::-1], atol=1e-4)
    assert np.corrcoef(target_cos, margins)[0, 1] < -0.9

    plain = get_head(name.replace("Plus", ""), E, C, s=64.0, m=0.4, std=std)
    plain.load_state_dict(head.state_dict())
    torch.manual_seed(7)
    plain_logits = plain(emb, labels)
    if "Arc" in name:
        _, plain_margins = recovered_arc_margins(plain, emb, labels, plain_logits)
    else:
        plain_margins = target_cos - plain_logits.detach().double().numpy()[np.arange(n), labels.numpy()] / 64.0
    np.testing.assert_allclose(plain_margins, drawn, atol=1e-4)


def test_curricularface_matches_independent_formula_and_updates_t():
    emb, labels = make_batch(32, seed=3)
    s, m = 64.0, 0.5
    head = get_head("CurricularFace", E, C, s=s, m=m)
    head.t.fill_(0.3)
    logits = head(emb, labels).detach().double().numpy()
    cos = cosines(head, emb)
    rows, y = np.arange(32), labels.numpy()
    target = cos[rows, y]
    t = 0.99 * 0.3 + 0.01 * target.mean()
    assert head.t.item() == pytest.approx(t, abs=1e-6)
    target_m = np.cos(np.arccos(target) + m)
    expected = np.where(cos > target_m[:, None], cos * (t + cos), cos)
    expected[rows, y] = np.where(target > math.cos(math.pi - m), target_m, target - math.sin(math.pi - m) * m)
    assert (cos > target_m[:, None]).sum() > 32  # some negatives really are modulated
    np.testing.assert_allclose(logits, s * expected, atol=2e-3)
    head.eval()
    head(emb, labels)
    assert head.t.item() == pytest.approx(t, abs=1e-6)


@pytest.mark.parametrize("name", list(HEADS))
def test_gradients_finite_at_cos_plus_minus_one(name):
    head = get_head(name, 4, 3)
    with torch.no_grad():
        head.kernel.copy_(torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    emb = torch.tensor([[2.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 1])  # target cosines exactly +1 and -1
    logits = head(emb, labels)
    F.cross_entropy(logits, labels).backward()
    assert torch.isfinite(logits).all()
    assert torch.isfinite(emb.grad).all() and torch.isfinite(head.kernel.grad).all()


def test_cos_plus_margin_values_and_finite_gradient_at_the_ends():
    cos = torch.tensor([1.0, -1.0, 0.3], requires_grad=True)
    out = cos_plus_margin(cos, 0.5)
    expected = [math.cos(0.5), math.cos(math.pi + 0.5), math.cos(math.acos(0.3) + 0.5)]
    np.testing.assert_allclose(out.detach().numpy(), expected, atol=1e-3)
    out.sum().backward()
    assert torch.isfinite(cos.grad).all()
    assert cos.grad[2].item() == pytest.approx(math.sin(math.acos(0.3) + 0.5) / math.sqrt(1 - 0.09), rel=1e-4)


@pytest.mark.parametrize("name", list(HEADS))
def test_fp32_under_bf16_autocast(name):
    emb, labels = make_batch(16, seed=4)
    layer = torch.nn.Linear(E, E)
    head = get_head(name, E, C).eval()  # eval: CurricularFace keeps its t, so both calls see the same state
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = layer(emb)
        torch.manual_seed(5)
        logits = head(features, labels)
    assert features.dtype == torch.bfloat16
    assert logits.dtype == torch.float32
    torch.manual_seed(5)
    reference = head(features.float(), labels)
    assert torch.equal(logits, reference)


def test_bad_labels_and_shapes_raise():
    head = get_head("ElasticArcFace", E, C)
    emb, labels = make_batch(4)
    for bad in (C, -1):
        wrong = labels.clone()
        wrong[2] = bad
        # Asserted on the device (no host wait in the step): on the CPU it raises at once.
        with pytest.raises(RuntimeError, match=rf"labels outside \[0, {C}\)"):
            head(emb, wrong)
    with pytest.raises(ValueError, match="labels must have shape"):
        head(emb, labels[:3])
    with pytest.raises(ValueError, match="embeddings"):
        head(torch.randn(4, E + 1), labels)


def test_kernel_shape_and_init():
    torch.manual_seed(0)
    head = get_head("ElasticArcFace", 64, 500)
    assert head.kernel.shape == (64, 500)
    assert abs(head.kernel.mean().item()) < 1e-3
    assert head.kernel.std().item() == pytest.approx(0.01, rel=0.05)


def test_teacher_loss_leaves_the_adaptor_head_elastic_arcface():
    """As in the release, the adaptor trains with ElasticArcFace (s 64, m 0.5, std 0.0125) whatever `loss` is."""
    for overrides in ({"loss": "CosFace"}, {"loss": "ElasticCosFacePlus", "s": 32.0, "m": 0.2, "std": 0.01}):
        cfg = load_config({**overrides, "embedding_size": E})
        adaptor = build_head(cfg, C, adaptor_stage=True)
        assert type(adaptor).__name__ == "ElasticArcFace"
        assert (adaptor.s, adaptor.m, adaptor.std) == (64.0, 0.5, 0.0125)
        assert type(build_head(cfg, C)).__name__ == overrides["loss"]


def test_loss_defaults_are_the_release_values():
    assert MARGIN_DEFAULTS["ElasticCosFacePlus"] == {"s": 64.0, "m": 0.35, "std": 0.02}
    assert MARGIN_DEFAULTS["ElasticArcFacePlus"] == {"s": 64.0, "m": 0.5, "std": 0.0175}
    assert get_head("ElasticCosFacePlus", E, C).std == 0.02
    # CosFace keeps its own margin (the release would give it m = 0.5; see the README table).
    assert MARGIN_DEFAULTS["CosFace"]["m"] == 0.35


def test_get_head_and_build_head():
    with pytest.raises(ValueError, match="known heads: ElasticArcFace"):
        get_head("SphereFace", E, C)
    with pytest.raises(ValueError, match="does not take"):
        get_head("ArcFace", E, C, std=0.1)
    cfg = load_config({"embedding_size": E})
    teacher = build_head(cfg, C)
    adaptor = build_head(cfg, C, adaptor_stage=True)
    assert type(teacher).__name__ == "ElasticArcFace" and teacher.kernel.shape == (E, C)
    assert (teacher.s, teacher.m, teacher.std, adaptor.std) == (64.0, 0.5, 0.05, 0.0125)
    cos_head = build_head(load_config({"loss": "CosFace", "m": 0.3}), C)
    assert type(cos_head).__name__ == "CosFace" and cos_head.m == 0.3 and cos_head.std == 0.0
    fixed_adaptor = build_head(load_config({"adaptor_loss": "ArcFace", "embedding_size": E}), C, adaptor_stage=True)
    assert type(fixed_adaptor).__name__ == "ArcFace" and fixed_adaptor.std == 0.0
    with pytest.raises(ValueError, match="std=0.05"):
        build_head(load_config({"loss": "CosFace", "std": 0.05}), C)

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from config.config import CONCAT_ORDER, ETHNICITIES
from eval.metrics.protocol import THRESHOLDS, kfold_accuracy, pair_distances, verify, verify_distances
from eval.metrics.reference_protocol import reference_verify as _reference_verify
from eval.rfw.embedding import adaptor_outputs, backbone_embed_fn, embed_images, image_outputs, multi_teacher_embed_fn


def random_pairs(seed, n_pairs, dim=64, noise=1.2):
    """L2-normalised embeddings; genuine pairs share a base vector, so their distances are smaller."""
    rng = np.random.default_rng(seed)
    issame = rng.random(n_pairs) < 0.5
    first = rng.standard_normal((n_pairs, dim))
    second = np.where(issame[:, None], first, rng.standard_normal((n_pairs, dim)))
    second = second + noise * rng.standard_normal((n_pairs, dim))
    emb = np.empty((2 * n_pairs, dim), dtype=np.float32)
    emb[0::2], emb[1::2] = first, second
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb, issame


@pytest.mark.parametrize("seed,n_pairs,nfolds", [(0, 600, 10), (1, 597, 10), (2, 1000, 10), (3, 403, 7)])
def test_vectorised_equals_loop_on_random_embeddings(seed, n_pairs, nfolds):
    emb, issame = random_pairs(seed, n_pairs)
    result = verify(emb, issame, nfolds=nfolds)
    ref_acc, ref_thr = _reference_verify(pair_distances(emb), issame, nfolds)
    assert np.array_equal(result.fold_accuracies, ref_acc)
    assert np.array_equal(result.fold_thresholds, ref_thr)
    assert result.accuracy == ref_acc.mean()
    assert result.accuracy_std == ref_acc.std()
    assert 0.6 < result.accuracy < 1.0  # the genuine correlation is visible, not trivially separable


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_equals_loop_with_ties_on_the_threshold_grid(seed):
    rng = np.random.default_rng(seed)
    n = 500
    issame = rng.random(n) < 0.5
    # Distances exactly on grid values (strict `<` boundaries) drawn from few levels: many tied accuracies.
    levels = THRESHOLDS[rng.choice(400, size=12, replace=False)]
    dist = np.where(issame, rng.choice(levels[:8], n), rng.choice(levels[4:], n))
    acc, thr = kfold_accuracy(dist, issame)
    ref_acc, ref_thr = _reference_verify(dist, issame)
    assert np.array_equal(acc, ref_acc)
    assert np.array_equal(thr, ref_thr)


def test_flat_accuracy_picks_the_first_threshold():
    dist = np.full(40, 1.234)
    issame = np.arange(40) % 2 == 0
    acc, thr = kfold_accuracy(dist, issame)
    ref_acc, ref_thr = _reference_verify(dist, issame)
    assert np.array_equal(thr, ref_thr) and np.array_equal(acc, ref_acc)
    assert np.all(thr == 0.0)  # every threshold ties on the training folds: argmax keeps the first


def test_hand_computed_two_fold_example():
    # fold 0: gen .105, imp .305, gen .505, imp .705 ; fold 1: gen .055, gen .405, imp .605, imp .805
    dist = np.array([0.105, 0.305, 0.505, 0.705, 0.055, 0.405, 0.605, 0.805])
    issame = np.array([True, False, True, False, True, True, False, False])
    result = verify_distances(dist, issame, nfolds=2)
    # Fold 0 held out: fold 1 is separated by any t in (0.405, 0.605] -> first grid value 0.41; on fold 0
    # that accepts .105 (right) and .305 (wrong), rejects .505 (wrong) and .705 (right): 2/4.
    # Fold 1 held out: on fold 0 accuracy peaks (3/4) first at t = 0.11; on fold 1 that accepts .055,
    # rejects .405 (wrong) and both impostors: 3/4.
    assert result.fold_thresholds == pytest.approx([0.41, 0.11])
    assert result.fold_accuracies.tolist() == [0.5, 0.75]
    assert result.accuracy == pytest.approx(0.625)
    assert result.accuracy_std == pytest.approx(0.125)
    assert result.threshold == pytest.approx(0.26)


def test_tar_at_far_and_auc_hand_computed():
    dist = np.array([0.1, 0.5, 0.2, 1.0, 0.9, 1.2, 1.5, 2.0])
    issame = np.array([True, False, True, False, True, False, True, False])
    result = verify_distances(dist, issame, nfolds=2)
    # 4 impostors can measure no FAR below 1/4: both operating points are not measurable.
    assert all(np.isnan(tar) for tar in result.tar_at_far.values()) and result.min_far == 0.25
    assert result.summary()["tar@far=0.001"] is None
    # AUC = P(d_gen < d_imp) over the 16 genuine/impostor combinations = (4 + 4 + 3 + 1) / 16.
    assert result.auc == pytest.approx(0.75)
    assert result.fpr[0] == 0.0 and result.tpr[-1] == 1.0


def test_perfect_separation():
    rng = np.random.default_rng(0)
    n = 20
    base = rng.standard_normal((n, 8))
    issame = np.arange(n) % 2 == 0
    emb = np.empty((2 * n, 8), dtype=np.float32)
    emb[0::2] = base
    emb[1::2] = np.where(issame[:, None], base, -base)  # impostors are antipodal: distance 4 after normalising
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    result = verify(emb, issame)
    assert result.accuracy == 1.0 and result.accuracy_std == 0.0
    assert np.allclose(result.fold_thresholds, 0.01)  # first threshold that accepts distance 0
    assert result.auc == 1.0 and np.isnan(result.tar_at_far[1e-4])  # 10 impostors cannot measure 1e-4


def test_tar_is_reported_only_where_the_impostors_can_measure_it():
    # 2000 impostors: FAR 1e-3 is 2 false accepts (measurable), 1e-4 is below 1/2000 (not measurable).
    rng = np.random.default_rng(0)
    issame = np.r_[np.ones(2000, bool), np.zeros(2000, bool)]
    dist = np.where(issame, rng.uniform(0, 2, 4000), rng.uniform(1, 4, 4000))
    result = verify_distances(dist, issame)
    imp = np.sort(dist[~issame])
    # Highest TAR with at most 2 impostors accepted: genuine below the third-smallest impostor distance.
    assert result.tar_at_far[1e-3] == pytest.approx(np.mean(dist[issame] < imp[2]))
    assert np.isnan(result.tar_at_far[1e-4]) and result.min_far == pytest.approx(1 / 2000)
    summary = result.summary()
    assert summary["tar@far=0.0001"] is None and summary["tar@far=0.001"] == result.tar_at_far[1e-3]


def test_input_errors():
    emb, issame = random_pairs(0, 20)
    with pytest.raises(ValueError, match="pairs"):
        verify(emb[:-1], issame)
    with pytest.raises(ValueError, match="labels"):
        verify(emb, issame[:-1])
    with pytest.raises(ValueError, match="genuine and impostor"):
        verify(emb, np.ones(20, dtype=bool))
    bad = emb.copy()
    bad[3, 0] = np.nan
    # A diverged model is reported as a degenerate evaluation (scored at chance), not a crash of the whole report.
    assert verify(bad, issame).degenerate == "non-finite embeddings"
    with pytest.raises(ValueError, match="folds"):
        verify(emb[:16], issame[:8])


class HalvesModel(nn.Module):
    """Embedding = (left-half mean, right-half mean, 1): it changes when the image is mirrored."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        half = x.shape[3] // 2
        left = x[:, :, :, :half].mean(dim=(1, 2, 3))
        right = x[:, :, :, half:].mean(dim=(1, 2, 3))
        return torch.stack([left, right, torch.ones_like(left)], dim=1)


def _images(n, size=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)


def test_flip_tta_uses_the_mirrored_image():
    images = _images(4)
    images = torch.cat([images, torch.flip(images, dims=[3])])  # rows i and i+4 are mirror images
    fn = backbone_embed_fn(HalvesModel())
    with_flip = embed_images(fn, images, flip=True)
    without = embed_images(fn, images, flip=False)
    assert with_flip.dtype == np.float32 and with_flip.shape == (8, 3)
    assert np.allclose(np.linalg.norm(with_flip, axis=1), 1.0)
    # Flip TTA makes an image and its mirror identical; without it they differ.
    assert np.allclose(with_flip[:4], with_flip[4:], atol=1e-6)
    assert not np.allclose(without[:4], without[4:], atol=1e-3)
    # And it is the sum of both views, normalised.
    scaled = (images.float() / 255 - 0.5) / 0.5
    plain = HalvesModel()(scaled)
    both = plain + HalvesModel()(torch.flip(scaled, dims=[3]))
    assert np.allclose(with_flip, torch.nn.functional.normalize(both, dim=1).numpy(), atol=1e-6)
    assert np.allclose(without, torch.nn.functional.normalize(plain, dim=1).numpy(), atol=1e-6)


def test_embed_images_normalises_pixels_and_batches_consistently():
    images = _images(10)
    images[0] = 0
    images[1] = 255
    model = HalvesModel()
    full = embed_images(backbone_embed_fn(model), images, batch_size=64)
    assert model.seen[0][0].min() == -1.0 and model.seen[0][1].max() == 1.0
    small = embed_images(backbone_embed_fn(HalvesModel()), images, batch_size=3)
    assert np.allclose(full, small, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        embed_images(backbone_embed_fn(model), images.float())


class ModeRecorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(3)
        self.modes = []

    def forward(self, x):
        self.modes.append((self.training, self.bn.training))
        return x.mean(dim=(2, 3))


def test_embedding_runs_in_eval_mode_and_restores_modes():
    model = ModeRecorder()
    model.train()
    model.bn.eval()  # a deliberately frozen submodule keeps its own mode afterwards
    embed_images(backbone_embed_fn(model), _images(3))
    assert model.modes and all(mode == (False, False) for mode in model.modes)
    assert model.training and not model.bn.training


class OneHotTeacher(nn.Module):
    """Outputs a scaled one-hot vector marking its ethnicity's index in ETHNICITIES (not CONCAT_ORDER)."""

    def __init__(self, ethnicity):
        super().__init__()
        self.index = ETHNICITIES.index(ethnicity)

    def forward(self, x):
        out = torch.zeros(x.shape[0], len(ETHNICITIES))
        out[:, self.index] = 3.0 + self.index  # different norms: the space must normalise each teacher
        return out


def test_multi_teacher_space_concatenates_in_the_given_order():
    teachers = [OneHotTeacher(eth) for eth in CONCAT_ORDER]
    emb = embed_images(multi_teacher_embed_fn(teachers, nn.Identity()), _images(2))
    expected = np.zeros((2, 16), dtype=np.float32)
    for block, eth in enumerate(CONCAT_ORDER):  # Asian, African, Caucasian, Indian
        expected[:, 4 * block + ETHNICITIES.index(eth)] = 0.5  # four unit blocks, then normalised
    assert np.allclose(emb, expected, atol=1e-6)
    assert CONCAT_ORDER == ("Asian", "African", "Caucasian", "Indian")


def test_multi_teacher_space_applies_the_adaptor_after_concatenation():
    teachers = [OneHotTeacher(eth) for eth in CONCAT_ORDER]
    adaptor = nn.Linear(16, 2, bias=False)
    with torch.no_grad():
        adaptor.weight.zero_()
        adaptor.weight[0, 4 * 0 + ETHNICITIES.index("Asian")] = 1.0  # reads the first block
        adaptor.weight[1, 4 * 3 + ETHNICITIES.index("Asian")] = 1.0  # would read Asian in the last block
    emb = embed_images(multi_teacher_embed_fn(teachers, adaptor), _images(2))
    assert np.allclose(emb, [[1.0, 0.0], [1.0, 0.0]], atol=1e-6)


class UnitTeacher(nn.Module):
    """A fixed random projection of the image, L2-normalised (or scaled by ``scale`` when not)."""

    def __init__(self, seed, normalise, scale=1.0):
        super().__init__()
        self.projection = torch.randn(3 * 8 * 8, 8, generator=torch.Generator().manual_seed(seed))
        self.normalise, self.scale = normalise, scale

    def forward(self, x):
        out = x.flatten(1) @ self.projection
        return F.normalize(out, dim=1) if self.normalise else self.scale * out


@pytest.mark.parametrize("normalise", [False, True])
def test_release_raw_teachers_option(normalise):
    """The release's adaptor evaluation concatenates raw teacher outputs; it matters only when they are not unit."""
    teachers = [UnitTeacher(seed, normalise, scale=1.0 + 2 * seed) for seed in range(4)]
    adaptor = nn.Linear(32, 8)
    images = _images(3)
    default = embed_images(multi_teacher_embed_fn(teachers, adaptor), images)
    raw = embed_images(multi_teacher_embed_fn(teachers, adaptor, raw_teachers=True), images)
    # The report builds the same spaces from outputs the teachers already gave (each teacher runs once).
    given = [image_outputs(backbone_embed_fn(t), images) for t in teachers]
    for raw_teachers, expected in ((False, default), (True, raw)):
        space = adaptor_outputs(given, adaptor, raw_teachers=raw_teachers, batch_size=2)
        np.testing.assert_allclose(space.embeddings(), expected, atol=1e-6)
    if normalise:
        np.testing.assert_allclose(raw, default, atol=1e-6)
    else:
        assert np.abs(raw - default).max() > 1e-2
        # The raw space is adaptor(concat of raw outputs), flip-summed, then normalised.
        batch = (torch.as_tensor(images).float() / 255 - 0.5) / 0.5
        with torch.no_grad():
            both = sum(adaptor(torch.cat([t(b) for t in teachers], dim=1)) for b in (batch, batch.flip(3)))
        np.testing.assert_allclose(raw, F.normalize(both, dim=1).numpy(), atol=1e-5)


def test_multi_teacher_space_needs_four_teachers():
    with pytest.raises(ValueError, match="exactly 4 teachers, got 3"):
        multi_teacher_embed_fn([OneHotTeacher(eth) for eth in CONCAT_ORDER[:3]], nn.Identity())

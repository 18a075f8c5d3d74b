"""Inputs in their real formats: ArcFace alignment, RFW as distributed (unaligned photos + landmark files)
against its aligned .bin twin, unaligned training folders, and val_targets benchmarks."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import train
from backbones import get_backbone
from config.config import ETHNICITIES, load_config
from eval.embed import main as embed_main
from eval.evaluate import report_work_dir, result_row
from eval.metrics.protocol import verify_distances
from eval.report.tables import write_report
from eval.rfw.embedding import RFWEvaluator, backbone_embed_fn, embed_images
from eval.rfw.pairs import load_bin
from helpers import tiny_overrides
from utils.data.align import ARCFACE_TEMPLATE, align_face, template
from utils.data.binfile import read_bin, write_bin
from utils.data.datasets import FaceDataset
from utils.data.image import decode_image, draw_flips, flip_images, normalize_images
from utils.data.index import scan_image_folder
from utils.data.synthetic import generate_synthetic
from utils.stages.cli import run_stage

SIZE, PAIRS, CANVAS = 32, 300, 160
# Lossless enough that the comparison measures alignment, not JPEG (no chroma subsampling: the synthetic
# identities live partly in colour).
JPEG_444 = [cv2.IMWRITE_JPEG_QUALITY, 100, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]


def _similarity(scale: float, angle_deg: float, shift: tuple[float, float]) -> np.ndarray:
    """2x3 matrix x -> scale * R(angle) x + shift."""
    angle = np.deg2rad(angle_deg)
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return np.hstack([rotation, np.array(shift, dtype=np.float64)[:, None]])


def _paste(face: np.ndarray, matrix: np.ndarray, canvas_size: int, rng: np.random.Generator,
           margin: int = 4) -> np.ndarray:
    """``face`` warped by ``matrix`` onto a smooth random canvas (a photo around a face). The face is
    extended by ``margin`` mirrored pixels, as a photo continues past the crop, so the crop's outer pixels
    do not interpolate against the background."""
    noise = rng.integers(0, 256, (canvas_size, canvas_size, 3), dtype=np.uint8)
    canvas = cv2.GaussianBlur(noise, (0, 0), 3.0)
    warped = cv2.warpAffine(face, matrix, (canvas_size, canvas_size), flags=cv2.INTER_CUBIC,
                            borderMode=cv2.BORDER_REFLECT_101)
    side = face.shape[0] + 2 * margin
    to_padded = matrix @ np.array([[1, 0, -margin], [0, 1, -margin], [0, 0, 1]], dtype=np.float64)
    mask = cv2.warpAffine(np.ones((side, side), np.float32), to_padded, (canvas_size, canvas_size))[..., None]
    return (mask * warped + (1 - mask) * canvas).round().clip(0, 255).astype(np.uint8)


def _landmarks(matrix: np.ndarray, size: int) -> np.ndarray:
    return template(size) @ matrix[:, :2].T + matrix[:, 2]


def _random_paste(rng: np.random.Generator, size: int, canvas: int) -> np.ndarray:
    scale = rng.uniform(3.0, 4.0)
    angle = rng.uniform(-25, 25)
    centre = np.array([size / 2, size / 2])
    rotation = _similarity(scale, angle, (0, 0))[:, :2]
    shift = canvas / 2 + rng.uniform(-6, 6, 2) - rotation @ centre
    return _similarity(scale, angle, tuple(shift))


def test_alignment_recovers_the_template_crop_of_a_pasted_face():
    rng = np.random.default_rng(0)
    # A smooth 112x112 "face" (blurred noise): interpolation error is then what alignment adds, not aliasing.
    face = cv2.GaussianBlur(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8), (0, 0), 2.0)
    matrix = _similarity(2.3, 17.0, (130.0, 40.0))
    canvas = _paste(face, matrix, 420, rng)
    landmarks = _landmarks(matrix, 112)
    aligned = align_face(canvas, landmarks, 112)
    error = np.abs(aligned.astype(np.float64) - face).mean()
    assert error < 1.0, f"mean absolute pixel error {error:.3f}"
    # The template itself: the 112 crop's points, scaled for other sizes, the 128 convention for 128.
    np.testing.assert_allclose(template(112), ARCFACE_TEMPLATE)
    np.testing.assert_allclose(template(224), 2 * ARCFACE_TEMPLATE)
    np.testing.assert_allclose(template(128)[:, 0], ARCFACE_TEMPLATE[:, 0] + 8)
    with pytest.raises(ValueError, match="degenerate"):
        align_face(canvas, np.zeros((5, 2)), 112)


def _norm_crop(image: np.ndarray, landmarks: np.ndarray, size: int) -> np.ndarray:
    """insightface's ``face_align.norm_crop``, written out here, independently of utils/data/align.py: the
    least-squares similarity transform of the five points onto the ArcFace template (scaled by size / 112),
    then ``cv2.warpAffine`` with its defaults (bilinear, black border)."""
    from skimage.transform import SimilarityTransform

    transform = SimilarityTransform.from_estimate(landmarks, ARCFACE_TEMPLATE * (size / 112.0))
    return cv2.warpAffine(image, transform.params[0:2, :], (size, size), borderValue=0.0)


def _write_distributed_rfw(bin_root: Path, out: Path, twin: Path, seed: int = 0) -> Path:
    """The RFW archive layout (test/data, test/txts with pairs and landmarks) from the faces of the .bin
    files, each pasted unaligned into a bigger canvas with known landmarks; and in ``twin`` its aligned .bin
    twin: every photo as written, cropped by ``_norm_crop`` from the landmarks as written, stored losslessly
    (PNG), pairs in the same order."""
    rng = np.random.default_rng(seed)
    twin.mkdir(parents=True)
    for eth in ETHNICITIES:
        images, issame = read_bin(bin_root / f"{eth}_test.bin")
        txts = out / "test" / "txts" / eth
        txts.mkdir(parents=True)
        pair_lines, lmk_lines, crops = [], [], []
        for p, same in enumerate(issame):
            names = [(f"m.{eth[:2].lower()}{p:04d}", 1), (f"m.{eth[:2].lower()}{p:04d}", 2)] if same else \
                    [(f"m.{eth[:2].lower()}{p:04d}a", 1), (f"m.{eth[:2].lower()}{p:04d}b", 1)]
            for (identity, n), jpeg in zip(names, images[2 * p:2 * p + 2]):
                face = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
                matrix = _random_paste(rng, SIZE, CANVAS)
                path = out / "test" / "data" / eth / identity / f"{identity}_{n:04d}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(path), _paste(face, matrix, CANVAS, rng), JPEG_444)
                points = " ".join(f"{v:.3f}" for v in _landmarks(matrix, SIZE).reshape(-1))
                lmk_lines.append(f"/test/data/{eth}/{identity}/{identity}_{n:04d}.jpg\t{p}\t{points}")
                written = np.array([float(v) for v in points.split()]).reshape(5, 2)
                crops.append(cv2.imencode(".png", _norm_crop(cv2.imread(str(path)), written, SIZE))[1].tobytes())
            first, second = names
            pair_lines.append(f"{first[0]}\t1\t2" if same else f"{first[0]}\t1\t{second[0]}\t1")
        (txts / f"{eth}_pairs.txt").write_text("\n".join(pair_lines) + "\n")
        (txts / f"{eth}_lmk.txt").write_text("\n".join(lmk_lines) + "\n")
        write_bin(twin / f"{eth}_test.bin", crops, issame)
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Synthetic faces (their RFW-style .bin files), the distributed RFW archive made from the same faces, and
    the archive's lossless aligned .bin twin."""
    root = tmp_path_factory.mktemp("inputs")
    # Enough identities for a network that verifies well above chance, so equal accuracies compare real
    # decisions rather than coin flips; shared_fraction=0: the world this tiny network tells apart best.
    generate_synthetic(root / "syn", ids_per_ethnicity=30, images_per_id=6, pairs_per_ethnicity=PAIRS,
                       image_size=SIZE, seed=0, shared_fraction=0.0)
    archive = _write_distributed_rfw(root / "syn" / "rfw", root / "rfw_archive", root / "twin")
    return {"bins": root / "syn" / "rfw", "archive": archive, "twin": root / "twin", "root": root}


@pytest.fixture(scope="module")
def unaligned(tiny_synthetic, tmp_path_factory):
    """The tiny synthetic training folder resized to 40x40 (not input_size) and a val_root with one .bin."""
    root = tmp_path_factory.mktemp("unaligned")
    for path in sorted((tiny_synthetic / "train").rglob("*.jpg")):
        target = root / "train" / path.relative_to(tiny_synthetic / "train")
        target.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(target), cv2.resize(cv2.imread(str(path)), (40, 40), interpolation=cv2.INTER_LINEAR))
    (root / "val").mkdir()
    shutil.copy(tiny_synthetic / "rfw" / "Asian_test.bin", root / "val" / "lfw.bin")  # any insightface-style .bin
    return {"train": root / "train", "val_root": root / "val", "rfw": tiny_synthetic / "rfw", "root": tiny_synthetic}


def test_rfw_layouts_are_found_and_logged(inputs, caplog):
    with caplog.at_level(logging.INFO, logger="mstkd.rfw"):
        for root in (inputs["archive"], inputs["archive"] / "test"):
            evaluator = RFWEvaluator(root, SIZE, ethnicities=("Indian",))
            assert evaluator.data["Indian"][0].shape == (2 * PAIRS, 3, SIZE, SIZE)
    assert "distributed layout" in caplog.text and "aligned from" in caplog.text and "Indian_lmk.txt" in caplog.text
    # Without the landmark file the unaligned photos are refused, with what to do.
    lmk = inputs["archive"] / "test" / "txts" / "Indian" / "Indian_lmk.txt"
    moved = lmk.with_suffix(".bak")
    lmk.rename(moved)
    try:
        with pytest.raises(ValueError, match=r"is 160x160, not the 32x32 aligned crop.*align.*allow_resize=True"):
            RFWEvaluator(inputs["archive"], SIZE, ethnicities=("Indian",))
    finally:
        moved.rename(lmk)


def test_unaligned_training_folder_is_refused_and_allow_resize_trains(unaligned, tmp_path):
    inputs = unaligned
    common = dict(ethnicity="Asian", rfw_root=str(inputs["rfw"]), val_root=str(inputs["val_root"]),
                  val_targets=["lfw"], num_epoch=2, milestones=[1], lr=0.2)
    with pytest.raises(ValueError, match=r"is 40x40, not the 32x32 aligned crop.*allow_resize=True"):
        run_stage(train.main, tiny_overrides(inputs["root"], tmp_path / "refused", **common,
                                             data_root=str(inputs["train"])))
    work = tmp_path / "work"
    result = run_stage(train.main, tiny_overrides(inputs["root"], work, **common, data_root=str(inputs["train"]),
                                                  allow_resize=True))
    assert result.complete
    # The benchmark is verified every epoch next to RFW, and RFW alone makes the fairness summary.
    epochs = json.loads((result.run_dir / "history.json").read_text())["epochs"]
    assert all(set(e["rfw"]) >= {"lfw", "avg", *ETHNICITIES} for e in epochs) and len(epochs) == 2
    assert "lfw" in (result.run_dir / "train.log").read_text()
    # ... and in the work-directory report, as a column after SER.
    report = report_work_dir(work, inputs["rfw"], device="cpu", val_root=inputs["val_root"], val_targets=["lfw"])
    rows = report.rows
    header = report.text.splitlines()[0].split()
    assert header[-4:] == ["Avg", "STD", "SER", "lfw"] and 0 <= rows[0].benchmarks["lfw"] <= 100
    assert "| lfw |" in (report.out_dir / "results.md").read_text()
    saved = json.loads((report.out_dir / "results.json").read_text())["rows"][0]
    assert saved["benchmarks"]["lfw"] == rows[0].benchmarks["lfw"]
    # Read back from the JSON when nothing changed, the benchmark column is still there.
    again = report_work_dir(work, inputs["rfw"], device="cpu", val_root=inputs["val_root"], val_targets=["lfw"])
    assert again.reused and again.rows[0].benchmarks == rows[0].benchmarks


def _trained_network(train_root: Path, epochs: int = 8) -> nn.Module:
    """A tiny iResNet trained on every identity of ``train_root`` (normalised softmax, flip augmentation)."""
    torch.manual_seed(0)
    index = scan_image_folder(train_root)
    dataset = FaceDataset(index, input_size=SIZE)
    images = normalize_images(torch.stack([dataset[i][0] for i in range(len(dataset))]))
    labels = torch.as_tensor(index.labels)
    model = get_backbone("iresnet18", input_size=SIZE, embedding_size=64, width=8)
    classes = nn.Parameter(torch.randn(index.num_classes, 64) * 0.01)
    optimizer = torch.optim.SGD([*model.parameters(), classes], lr=0.1, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(order), 32):
            rows = order[start:start + 32]
            batch = flip_images(images[rows], draw_flips(len(rows), generator))
            logits = 16 * F.linear(F.normalize(model(batch)), F.normalize(classes))
            loss = F.cross_entropy(logits, labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model


@pytest.mark.float_sensitive
def test_rfw_as_distributed_and_its_aligned_bin_twin_give_the_same_accuracies(inputs):
    """The archive aligned on load gives the very pixels of its lossless twin (insightface's norm_crop, PNG),
    hence the very same accuracies, on any CPU. Against the generator's JPEG crops the alignment only comes
    close (mean error below 1 grey level): JPEG re-encoding, which a weak network turns into whole points
    of accuracy, so accuracies are compared against the lossless twin only."""
    from_tree = RFWEvaluator(inputs["archive"], SIZE)
    from_twin = RFWEvaluator(inputs["twin"], SIZE)
    for eth in ETHNICITIES:
        assert torch.equal(from_tree.data[eth][0], from_twin.data[eth][0]), eth
        np.testing.assert_array_equal(from_tree.data[eth][1], from_twin.data[eth][1])
    from_bins = RFWEvaluator(inputs["bins"], SIZE)
    pixel_error = np.mean([(from_tree.data[eth][0].float() - from_bins.data[eth][0].float()).abs().mean().item()
                           for eth in ETHNICITIES])
    assert pixel_error < 1.0, f"aligned RFW photos differ from their crops by {pixel_error:.2f} grey levels"
    embed = backbone_embed_fn(_trained_network(inputs["root"] / "syn" / "train"))
    tree = {eth: 100 * r.accuracy for eth, r in from_tree(embed).items()}
    twin = {eth: 100 * r.accuracy for eth, r in from_twin(embed).items()}
    assert tree == twin
    assert min(twin.values()) > 70.0, twin  # a network that verifies well: the equal accuracies are real decisions


def test_bin_images_of_another_size_need_allow_resize(unaligned):
    inputs = unaligned
    with pytest.raises(ValueError, match="allow_resize=True"):
        load_bin(inputs["val_root"] / "lfw.bin", 24)
    assert load_bin(inputs["val_root"] / "lfw.bin", 24, allow_resize=True)[0].shape[-1] == 24


def test_embed_writes_a_memory_mapped_array_and_an_index(unaligned, tmp_path, capsys):
    torch.manual_seed(0)
    model = get_backbone("iresnet18", input_size=SIZE, embedding_size=16, width=8)
    weights = tmp_path / "model.pth"
    torch.save(model.state_dict(), weights)
    folder = unaligned["root"] / "train" / "Asian"
    common = ["--backbone", str(weights), "--network", "iresnet18", "--input-size", str(SIZE), "--embedding-size",
              "16", "--width", "8", "--device", "cpu", "--batch-size", "5"]
    embeddings, index = embed_main([*common, "--images", str(folder), "--out", str(tmp_path / "plain")])
    array = np.load(embeddings, mmap_mode="r")
    rows = [line.split("\t") for line in index.read_text().splitlines()]
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg"))
    assert isinstance(array, np.memmap) and array.shape == (len(files), 16) and array.dtype == np.float32
    assert [name for _, name in rows] == files and [int(i) for i, _ in rows] == list(range(len(files)))
    # Row i is the embedding of the file named on line i, the same as the verification embedding of it.
    image = torch.from_numpy(decode_image((folder / files[3]).read_bytes(), SIZE, files[3]).transpose(2, 0, 1))
    expected = embed_images(backbone_embed_fn(model), image[None], flip=False)[0]
    np.testing.assert_allclose(array[3], expected, atol=1e-5)
    flipped = np.load(embed_main([*common, "--images", str(folder), "--out", str(tmp_path / "flip"), "--flip"])[0])
    expected_flip = embed_images(backbone_embed_fn(model), image[None], flip=True)[0]
    np.testing.assert_allclose(flipped[3], expected_flip, atol=1e-5)
    assert not np.allclose(flipped[3], array[3])
    # A .bin: one row per image, named after the file.
    bin_source = str(unaligned["val_root"] / "lfw.bin")
    _, bin_index = embed_main([*common, "--images", bin_source, "--out", str(tmp_path / "b")])
    assert bin_index.read_text().splitlines()[1] == "1\tlfw.bin[1]"
    # Unaligned images are refused, and nothing claims to be complete.
    with pytest.raises(SystemExit) as refused:
        embed_main([*common, "--images", str(unaligned["train"] / "Asian"), "--out", str(tmp_path / "bad")])
    assert refused.value.code == 2 and "is 40x40, not the 32x32 aligned crop" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "rows.tsv").exists() and not (tmp_path / "bad" / "embeddings.npy").exists()


def test_unmeasurable_tar_reads_not_measurable_in_every_report_file(tmp_path):
    rng = np.random.default_rng(0)
    issame = np.r_[np.ones(300, bool), np.zeros(300, bool)]  # 300 impostors: FAR 1e-3 and 1e-4 unmeasurable
    distances = np.where(issame, rng.normal(1.0, 0.3, 600), rng.normal(2.0, 0.3, 600))
    row = result_row("model", {eth: verify_distances(distances, issame) for eth in ETHNICITIES})
    paths = write_report([row], tmp_path)
    assert "| model | n/m | n/m |" in paths["md"].read_text()
    assert "not measurable" in paths["csv"].read_text()
    saved = json.loads(paths["json"].read_text())["rows"][0]["extra"]
    assert saved["Asian/tar@far=0.001"] is None and saved["Asian/min_measurable_far"] == pytest.approx(1 / 300)


@pytest.mark.parametrize("overrides, message", [
    (["val_targets=lfw", "val_root=v", "rfw_root=r"], "must be a list of names"),
    (["val_targets=['lfw']", "rfw_root=r"], "needs val_root"),
])
def test_val_targets_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(overrides)

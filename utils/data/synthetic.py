"""Synthetic face-like data in the real layouts, for the demo, the tests and the benchmarks.

    python -m utils.data.synthetic --out DIR [--ids-per-ethnicity 50] [--images-per-id 10]
        [--pairs-per-ethnicity 300] [--image-size 112] [--seed 0] [--jpeg-quality 95]
        [--shared-fraction 0.4] [--overwrite]

writes ``DIR/train/<Ethnicity>/<identity>/<n>.jpg`` (BUPT layout, ``data_root=DIR/train``),
``DIR/rfw/<Ethnicity>_test.bin`` (RFW-style pairs, ``rfw_root=DIR/rfw``) and ``DIR/synthetic.json``
(the parameters; written last, so its presence marks a complete set).

How images are made, and why:

* Every image shares one face template (an ellipse with eye, nose and mouth shading), so the
  template carries no identity.
* Each ethnicity has a base colour and its own basis patterns: mirror-symmetric Gabor-like blobs
  (faces are roughly symmetric, and a horizontal flip, the training augmentation, then keeps both
  the identity and the pattern family) whose stripe orientation lies in that ethnicity's band (0, 30,
  60 or 90 degrees from vertical, +-6) and whose frequency lies in a low or high band, alternating,
  so any two ethnicities differ by 60 degrees or in frequency. A few cycles per face keep them
  resolvable down to 32x32. Identity = identity-specific coefficients on its ethnicity's basis, so
  identities of one ethnicity differ along that ethnicity's directions, and a network that
  learned one ethnicity's directions sees another's only partially.
* ``shared_fraction`` (default 0.4) of each identity's pattern energy lies along identity directions
  shared by every ethnicity (their own basis: any orientation, any colour), the rest along its
  ethnicity's own: ``sqrt(f) * shared + sqrt(1 - f) * specific``, each part with unit energy. Real
  face identity features are largely shared across groups, so a single-group model verifies other
  groups a few points worse, not at chance; 0 gives group-specific directions only (the v1 world,
  byte for byte), 1 removes the group-specific part. The README reports how the demo's specialized
  teachers behave at each value.
* Each image adds within-identity coefficient jitter (expression), a random similarity transform
  (shift, scale, rotation), illumination (gain, bias, linear gradient, colour cast), a random
  background level, uniform pixel noise and JPEG compression, so verification is neither trivial nor
  impossible.

Random streams are keyed by (seed, ethnicity, purpose, item), so the same seed gives byte-identical
files, and changing the number of pairs does not change the training images.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import cv2
import numpy as np

from config.config import ETHNICITIES
from utils.core.errors import ExistingOutputError
from utils.core.io import atomic_write_json
from utils.data.binfile import write_bin

BASES_PER_ETHNICITY = 12
# RGB base colours: a face tone per ethnicity (it tells ethnicities apart, never identities).
BASE_COLOURS = {
    "African": (105, 72, 55),
    "Asian": (196, 160, 128),
    "Caucasian": (214, 178, 160),
    "Indian": (160, 116, 88),
}
PATTERN_AMPLITUDE = 34.0  # grey levels of the identity patterns (RMS of the sum)
WITHIN_ID_JITTER = 0.35  # std of per-image coefficient jitter relative to the identity coefficients
NOISE_STD = 7.0  # grey levels (std) of per-pixel noise
ORIENTATION_BANDS = (0.0, 30.0, 60.0, 90.0)  # degrees, per ethnicity in ETHNICITIES order
ORIENTATION_SPREAD = 6.0  # +- degrees around the band centre
FREQUENCY_RANGE = (0.9, 1.8)  # cycles per unit length (the image is 2 units wide), every ethnicity
# RGB direction each ethnicity's patterns modulate: tetrahedron vertices, pairwise |cos| = 1/3.
COLOUR_DIRECTIONS = ((1.0, 1.0, -1.0), (1.0, -1.0, 1.0), (-1.0, 1.0, 1.0), (1.0, 1.0, 1.0))
COLOUR_JITTER = 0.15  # per-pattern deviation from the ethnicity's colour direction
NUISANCE_BASES = 16  # shared patterns mixed into every image with fresh coefficients
NUISANCE_LEVEL = 0.6  # std of their coefficients (identity coefficients have std 1)
SHARED_BASES = 12  # identity patterns shared by every ethnicity
SHARED_FRACTION = 0.4  # default share of identity pattern energy along the shared patterns (see the module doc)
_STREAM_BASIS, _STREAM_TRAIN_ID, _STREAM_TEST_ID, _STREAM_PAIRS = 0, 1, 2, 3
_STREAM_SHARED_BASIS, _STREAM_TRAIN_SHARED, _STREAM_TEST_SHARED = 4, 5, 6


def _rng(seed: int, eth_code: int, stream: int, item: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, eth_code, stream, item])


def _identity(seed: int, eth_code: int, i: int, held_out: bool,
              shared_fraction: float = 0.0) -> tuple[np.ndarray, np.random.Generator]:
    """Coefficients of training (or held-out test) identity ``i`` and the stream its images draw from.
    Training and test identities come from separate streams, so they never coincide. With a shared part
    the coefficients of the shared patterns follow those of the ethnicity's own, drawn from their own
    stream so that the images' stream is the same as without."""
    rng = _rng(seed, eth_code, _STREAM_TEST_ID if held_out else _STREAM_TRAIN_ID, i)
    coeffs = rng.normal(0, 1, BASES_PER_ETHNICITY)
    if shared_fraction > 0:
        shared = _rng(seed, eth_code, _STREAM_TEST_SHARED if held_out else _STREAM_TRAIN_SHARED, i)
        coeffs = np.concatenate([coeffs, shared.normal(0, 1, SHARED_BASES)])
    return coeffs, rng


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in [-1, 1] coordinates (x right, y down)."""
    axis = (np.arange(size, dtype=np.float64) + 0.5) / size * 2 - 1
    return np.meshgrid(axis, axis)


def _blob(x: np.ndarray, y: np.ndarray, cx: float, cy: float, sx: float, sy: float) -> np.ndarray:
    return np.exp(-(((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2) / 2)


def _face_template(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Soft face mask [S, S] and shading [S, S] (eyes, nose, mouth darker) shared by everyone."""
    x, y = _grid(size)
    mask = 1 / (1 + np.exp((np.sqrt((x / 0.68) ** 2 + (y / 0.86) ** 2) - 1) * 14))
    shading = 1 - 0.55 * (_blob(x, y, -0.3, -0.18, 0.11, 0.06) + _blob(x, y, 0.3, -0.18, 0.11, 0.06))
    shading -= 0.25 * _blob(x, y, 0, 0.12, 0.06, 0.16) + 0.45 * _blob(x, y, 0, 0.45, 0.22, 0.05)
    return mask, shading * mask


def _pattern(rng: np.random.Generator, size: int, theta_deg: float, colour: np.ndarray) -> np.ndarray:
    """A Gabor-like blob plus its mirror image [S, S, 3] with unit RMS. Mirroring keeps a pattern
    and its folded orientation (stripe angle from vertical) through a horizontal flip."""
    x, y = _grid(size)
    mask, _ = _face_template(size)
    theta = math.radians(theta_deg)
    freq = rng.uniform(*FREQUENCY_RANGE)
    phase = rng.uniform(0, 2 * math.pi)
    cx, cy = rng.uniform(0, 0.4), rng.uniform(-0.5, 0.5)
    sx, sy = rng.uniform(0.25, 0.5, size=2)
    half = [_blob(x, y, side * cx, cy, sx, sy)
            * np.cos(2 * math.pi * freq * (side * x * math.cos(theta) + y * math.sin(theta)) + phase)
            for side in (1, -1)]
    pattern = ((half[0] + half[1]) * mask)[..., None] * colour
    return pattern / np.sqrt(np.mean(pattern ** 2))


def _basis(size: int, seed: int, eth_code: int) -> np.ndarray:
    """The ethnicity's identity patterns [K, S, S, 3]: orientations in its band, colours along its
    colour direction."""
    rng = _rng(seed, eth_code, _STREAM_BASIS)
    centre, direction = ORIENTATION_BANDS[eth_code], np.array(COLOUR_DIRECTIONS[eth_code]) / math.sqrt(3)
    return np.stack([
        _pattern(rng, size, centre + rng.uniform(-ORIENTATION_SPREAD, ORIENTATION_SPREAD),
                 direction + rng.normal(0, COLOUR_JITTER, size=3))
        for _ in range(BASES_PER_ETHNICITY)])


def _common_basis(size: int, seed: int, stream: int, count: int) -> np.ndarray:
    """``count`` patterns shared by every ethnicity [count, S, S, 3] (any orientation, any colour) from ``stream``:
    the shared identity patterns, or the nuisance patterns mixed afresh into each image so that a network learns
    to ignore whatever is not an identity direction."""
    rng = _rng(seed, len(ETHNICITIES), stream)
    return np.stack([_pattern(rng, size, rng.uniform(0, 90), rng.normal(0, 1, size=3)) for _ in range(count)])


class _Renderer:
    """Renders images of one ethnicity at one size (float32 maths: the generator must stay fast)."""

    def __init__(self, size: int, seed: int, eth: str, jpeg_quality: int, shared_fraction: float = 0.0):
        self.size, self.jpeg_quality, self.shared_fraction = size, jpeg_quality, shared_fraction
        self.eth_code = ETHNICITIES.index(eth)
        mask, shading = _face_template(size)
        scale = PATTERN_AMPLITUDE / math.sqrt(BASES_PER_ETHNICITY)
        # Identity coefficients have unit variance in each part, so a part's weight sqrt(share) gives it that
        # share of the identity energy; the nuisance keeps its level whatever the share.
        parts = [(_basis(size, seed, self.eth_code), math.sqrt(1.0 - shared_fraction))]
        if shared_fraction > 0:
            parts.append((_common_basis(size, seed, _STREAM_SHARED_BASIS, SHARED_BASES), math.sqrt(shared_fraction)))
        parts.append((_common_basis(size, seed, _STREAM_BASIS, NUISANCE_BASES), 1.0))
        basis = np.concatenate([patterns * mask[None, ..., None] * scale * weight for patterns, weight in parts])
        self.basis = basis.reshape(len(basis), -1).astype(np.float32)
        self.outside = (1 - mask)[..., None].astype(np.float32)
        self.face = (shading[..., None] * np.array(BASE_COLOURS[eth])).astype(np.float32)
        x, y = _grid(size)
        self.x, self.y = x[..., None].astype(np.float32), y[..., None].astype(np.float32)

    def image(self, coeffs: np.ndarray, rng: np.random.Generator) -> bytes:
        size = self.size
        mix = np.concatenate([coeffs + rng.normal(0, WITHIN_ID_JITTER, coeffs.shape),
                              rng.normal(0, NUISANCE_LEVEL, NUISANCE_BASES)]).astype(np.float32)
        img = (mix @ self.basis).reshape(size, size, 3)
        img += self.face
        img += np.float32(rng.uniform(40, 200)) * self.outside
        # Similarity transform about the centre: shift up to 4% of the side, scale 0.94-1.06, +-6 degrees.
        angle, zoom = rng.uniform(-6, 6), rng.uniform(0.94, 1.06)
        matrix = cv2.getRotationMatrix2D((size / 2, size / 2), angle, zoom)
        matrix[:, 2] += rng.uniform(-0.04, 0.04, size=2) * size
        img = cv2.warpAffine(img, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        gradient_dir = rng.uniform(0, 2 * math.pi)
        gradient_size = rng.uniform(0, 25)
        img *= (rng.uniform(0.75, 1.25) * rng.uniform(0.93, 1.07, size=3)).astype(np.float32)
        img += np.float32(rng.uniform(-20, 20))
        img += np.float32(gradient_size * math.cos(gradient_dir)) * self.x
        img += np.float32(gradient_size * math.sin(gradient_dir)) * self.y
        # Uniform noise with NOISE_STD as its std: a quarter of the cost of Gaussian draws.
        img += (rng.random(img.shape, dtype=np.float32) - np.float32(0.5)) * np.float32(NOISE_STD * math.sqrt(12))
        rgb = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        ok, encoded = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        if not ok:
            raise RuntimeError("OpenCV failed to encode a synthetic image as JPEG")
        return encoded.tobytes()


def _params(ids_per_ethnicity: int, images_per_id: int, pairs_per_ethnicity: int, image_size: int, seed: int,
            jpeg_quality: int, shared_fraction: float) -> dict:
    return {"generator": "mst-kd synthetic v2", "ids_per_ethnicity": ids_per_ethnicity,
            "images_per_id": images_per_id, "pairs_per_ethnicity": pairs_per_ethnicity,
            "image_size": image_size, "seed": seed, "jpeg_quality": jpeg_quality,
            "shared_fraction": shared_fraction, "test_ids_per_ethnicity": _test_ids(ids_per_ethnicity)}


def _test_ids(ids_per_ethnicity: int) -> int:
    return max(2, ids_per_ethnicity)


def _write_train(out: Path, renderer: _Renderer, eth: str, seed: int, ids: int, images_per_id: int) -> None:
    for i in range(ids):
        coeffs, rng = _identity(seed, renderer.eth_code, i, held_out=False, shared_fraction=renderer.shared_fraction)
        folder = out / eth / f"{eth.lower()}_{i:05d}"
        folder.mkdir(parents=True)
        for n in range(images_per_id):
            (folder / f"{n:04d}.jpg").write_bytes(renderer.image(coeffs, rng))


def _write_pairs(path: Path, renderer: _Renderer, seed: int, num_ids: int, pairs: int) -> None:
    """Alternating genuine/impostor pairs of held-out identities (every fold of 10 is balanced)."""
    ids = [_identity(seed, renderer.eth_code, j, held_out=True, shared_fraction=renderer.shared_fraction)[0]
           for j in range(num_ids)]
    rng = _rng(seed, renderer.eth_code, _STREAM_PAIRS)
    images, issame = [], []
    for p in range(pairs):
        genuine = p % 2 == 0
        first, second = rng.choice(num_ids, size=2, replace=False)
        if genuine:
            second = first
        images += [renderer.image(ids[first], rng), renderer.image(ids[second], rng)]
        issame.append(genuine)
    write_bin(path, images, issame)


def generate_synthetic(out_dir: str | Path, *, ids_per_ethnicity: int = 50, images_per_id: int = 10,
                       pairs_per_ethnicity: int = 300, image_size: int = 112, seed: int = 0,
                       jpeg_quality: int = 95, shared_fraction: float = SHARED_FRACTION,
                       overwrite: bool = False) -> dict:
    """Write the synthetic set under ``out_dir`` (see the module doc) and return its summary.

    A complete set with the same parameters is reused; a different or incomplete one is an error
    unless ``overwrite`` (which deletes ``train/``, ``rfw/`` and ``synthetic.json`` first).
    """
    out = Path(out_dir)
    for name, value in (("ids_per_ethnicity", ids_per_ethnicity), ("images_per_id", images_per_id),
                        ("pairs_per_ethnicity", pairs_per_ethnicity), ("image_size", image_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not 0.0 <= shared_fraction <= 1.0:
        raise ValueError(f"shared_fraction must be in [0, 1], got {shared_fraction}")
    params = _params(ids_per_ethnicity, images_per_id, pairs_per_ethnicity, image_size, seed, jpeg_quality,
                     float(shared_fraction))
    manifest = out / "synthetic.json"
    train, rfw = out / "train", out / "rfw"
    summary = {"train_root": str(train), "rfw_root": str(rfw), **params,
               "num_images": len(ETHNICITIES) * ids_per_ethnicity * images_per_id,
               "num_identities": len(ETHNICITIES) * ids_per_ethnicity}
    if manifest.is_file() and json.loads(manifest.read_text()) == params:
        return {**summary, "reused": True}
    if train.exists() or rfw.exists() or manifest.exists():
        if not overwrite:
            raise ExistingOutputError(f"{out} already holds a different or incomplete synthetic set; "
                                  "pass overwrite=True (--overwrite) to replace it")
        manifest.unlink(missing_ok=True)
        for folder in (train, rfw):
            if folder.exists():
                shutil.rmtree(folder)
    start = time.perf_counter()
    rfw.mkdir(parents=True)
    for eth in ETHNICITIES:
        renderer = _Renderer(image_size, seed, eth, jpeg_quality, shared_fraction)
        _write_train(train, renderer, eth, seed, ids_per_ethnicity, images_per_id)
        _write_pairs(rfw / f"{eth}_test.bin", renderer, seed, _test_ids(ids_per_ethnicity), pairs_per_ethnicity)
    atomic_write_json(manifest, params)
    return {**summary, "reused": False, "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic BUPT-layout training set and RFW-style .bin files.")
    parser.add_argument("--out", required=True, help="output folder (train/, rfw/, synthetic.json)")
    parser.add_argument("--ids-per-ethnicity", type=int, default=50)
    parser.add_argument("--images-per-id", type=int, default=10)
    parser.add_argument("--pairs-per-ethnicity", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jpeg-quality", type=int, default=95)
    parser.add_argument("--shared-fraction", type=float, default=SHARED_FRACTION,
                        help="share of identity pattern energy shared by every ethnicity (0: none, the v1 world)")
    parser.add_argument("--overwrite", action="store_true", help="replace a different existing set")
    args = parser.parse_args(argv)
    summary = generate_synthetic(args.out, ids_per_ethnicity=args.ids_per_ethnicity, images_per_id=args.images_per_id,
                                 pairs_per_ethnicity=args.pairs_per_ethnicity, image_size=args.image_size,
                                 seed=args.seed, jpeg_quality=args.jpeg_quality,
                                 shared_fraction=args.shared_fraction, overwrite=args.overwrite)
    state = "reused" if summary["reused"] else f"written in {summary['seconds']:.1f} s"
    print(f"synthetic set {state}: {summary['num_images']} training images of {summary['num_identities']} "
          f"identities in {summary['train_root']}, {args.pairs_per_ethnicity} pairs per ethnicity in {summary['rfw_root']}")


if __name__ == "__main__":
    main()

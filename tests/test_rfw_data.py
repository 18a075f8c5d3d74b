"""eval.rfw.pairs: .bin files (round trip, historic encodings, malicious pickles) and RFW pair lists."""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from eval.rfw.pairs import load_bin, load_pair_list, load_rfw
from helpers import jpeg_bytes
from utils.data.binfile import write_bin

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (120, 120, 20)]  # make_bin_fixtures.py


def mean_colours(images: torch.Tensor) -> np.ndarray:
    return images.float().mean(dim=(2, 3)).numpy()


def test_write_load_round_trip(tmp_path):
    colours = [(10 * i, 255 - 20 * i, 100) for i in range(6)]
    write_bin(tmp_path / "x.bin", [jpeg_bytes(c, 16) for c in colours], [True, False, True])
    images, issame = load_bin(tmp_path / "x.bin", 16)
    assert images.shape == (6, 3, 16, 16) and images.dtype == torch.uint8
    assert issame.dtype == bool and issame.tolist() == [True, False, True]
    np.testing.assert_allclose(mean_colours(images), np.array(colours), atol=2)
    with pytest.raises(ValueError, match=r"x.bin\[0\] is 16x16, not the 8x8 aligned crop.*allow_resize=True"):
        load_bin(tmp_path / "x.bin", 8)
    assert load_bin(tmp_path / "x.bin", 8, allow_resize=True)[0].shape == (6, 3, 8, 8)  # resized on purpose


@pytest.mark.parametrize("name", ["bin_py2.bin", "bin_numpy1.bin"])
def test_historic_insightface_encodings(name):
    images, issame = load_bin(FIXTURES / name, 8)
    assert issame.tolist() == [True, False]
    np.testing.assert_allclose(mean_colours(images), np.array(FIXTURE_COLOURS), atol=2)


def test_python2_fixture_needs_the_bytes_encoding():
    with open(FIXTURES / "bin_py2.bin", "rb") as handle, pytest.raises(UnicodeDecodeError):
        pickle.load(handle)


class RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class CallsEval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def test_malicious_pickles_are_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    payloads = {
        "system.bin": ([RunsACommand(marker), b"x"], [True]),
        "eval.bin": ([b"x", b"y"], [CallsEval()]),
        "outer.bin": RunsACommand(marker),
    }
    for name, payload in payloads.items():
        path = tmp_path / name
        path.write_bytes(pickle.dumps(payload, protocol=2))
        with pytest.raises(pickle.UnpicklingError, match=re.escape(str(path))):
            load_bin(path, 8)
    assert not marker.exists()


def test_codecs_global_only_decodes_latin1(tmp_path):
    # Protocol-2 pickles of bytes call _codecs.encode(text, 'latin1'); any other codec is refused.
    good = tmp_path / "good.bin"
    good.write_bytes(pickle.dumps(([jpeg_bytes((1, 2, 3)), jpeg_bytes((4, 5, 6))], [False]), protocol=2))
    assert load_bin(good, 8)[1].tolist() == [False]
    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps(([jpeg_bytes((1, 2, 3))], [True]), protocol=2).replace(b"latin1", b"rot_13"))
    with pytest.raises(pickle.UnpicklingError, match=re.escape(str(evil)) + ".*rot_13"):
        load_bin(evil, 8)


def test_malformed_bins_and_broken_images_are_named(tmp_path):
    wrong = tmp_path / "wrong.bin"
    wrong.write_bytes(pickle.dumps(([b"a", b"b", b"c"], [True])))
    with pytest.raises(ValueError, match="wrong.bin: 3 images for 1 pairs"):
        load_bin(wrong, 8)
    damaged = tmp_path / "damaged.bin"
    write_bin(damaged, [b"a", b"b"], [True])
    for data in (damaged.read_bytes()[:-5], b"not a pickle at all"):
        damaged.write_bytes(data)
        with pytest.raises(ValueError, match=re.escape(f"cannot read verification file {damaged}")):
            load_bin(damaged, 8)
    truncated = tmp_path / "trunc.bin"
    good = jpeg_bytes((9, 9, 9))
    write_bin(truncated, [good, good[: len(good) // 2]], [True])
    with pytest.raises(ValueError, match=re.escape(f"{truncated}[1]")):
        load_bin(truncated, 8)
    with pytest.raises(FileNotFoundError, match="absent.bin"):
        load_bin(tmp_path / "absent.bin", 8)


def make_rfw_pairs(root: Path, ethnicity: str) -> Path:
    """RFW release layout: data/<Eth>/<name>/<name>_000N.jpg and txts/<Eth>/<Eth>_pairs.txt."""
    for name, colour in (("m.0aa", (200, 10, 10)), ("m.0bb", (10, 10, 200))):
        for n in (1, 2):
            path = root / "data" / ethnicity / name / f"{name}_{n:04d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(jpeg_bytes(colour))
    pairs = root / "txts" / ethnicity / f"{ethnicity}_pairs.txt"
    pairs.parent.mkdir(parents=True, exist_ok=True)
    pairs.write_text("m.0aa\t1\t2\n\nm.0aa 2 m.0bb 1\nm.0bb\t2\t1\n")
    return pairs


def test_pair_list(tmp_path):
    pairs = make_rfw_pairs(tmp_path, "Asian")
    images, issame = load_pair_list(tmp_path / "data" / "Asian", pairs, 8)
    assert issame.tolist() == [True, False, True]
    reds = mean_colours(images)[:, 0] > 100
    assert reds.tolist() == [True, True, True, False, False, False]
    pairs.write_text("10 300\nm.0aa 1 2\n")  # an LFW-style header line is skipped
    assert load_pair_list(tmp_path / "data" / "Asian", pairs, 8)[1].tolist() == [True]
    pairs.write_text("m.0aa 1 9\n")
    with pytest.raises(FileNotFoundError, match="m.0aa_0009.jpg"):
        load_pair_list(tmp_path / "data" / "Asian", pairs, 8)
    pairs.write_text("m.0aa 1 2\nm.0aa 1 m.0bb\n")
    with pytest.raises(ValueError, match=re.escape(f"{pairs}:2")):
        load_pair_list(tmp_path / "data" / "Asian", pairs, 8)


def test_load_rfw_mixes_formats_and_names_missing_files(tmp_path):
    write_bin(tmp_path / "African_test.bin", [jpeg_bytes((1, 1, 1)), jpeg_bytes((2, 2, 2))], [True])
    make_rfw_pairs(tmp_path, "Indian")
    data = load_rfw(tmp_path, 8, ethnicities=("African", "Indian"))
    assert list(data) == ["African", "Indian"]
    assert data["African"][1].tolist() == [True] and data["Indian"][1].tolist() == [True, False, True]
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "Asian_test.bin"))):
        load_rfw(tmp_path, 8)

"""The insightface ``.bin`` verification format: a pickle of ``(images, issame)``.

``images`` is a list of 2N encoded images (JPEG bytes, or 1-D uint8 numpy arrays where the file was made
from ``cv2.imencode`` output) and ``issame`` a list of N booleans (Python or numpy), pair i being images 2i
and 2i+1. Files written under Python 2 hold the images as ``str``, hence ``encoding='bytes'``. Pickles can
run code, so a restricted unpickler admits only the few classes such a file needs and refuses everything else.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np

from utils.core.errors import InvalidInputError
from utils.core.io import atomic_path

# (module, name) pairs a .bin may reference: numpy arrays and scalars (bool flags, uint8 image
# buffers from cv2.imencode). These only build arrays from data; everything else a pickle can name,
# builtins included, is refused. numpy 1.x pickles name numpy.core, which numpy 2 calls numpy._core.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy", "bool_"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
}
_BIN_PROTOCOL = 4


class RefusedPickleError(pickle.UnpicklingError, InvalidInputError):
    """A ``.bin`` named a global other than the few it may use; it was refused before anything ran."""


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Python 3 pickles bytes under protocol 2 as ``_codecs.encode(text, 'latin1')``; only that
    spelling is honoured, so the global cannot reach other codecs."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise RefusedPickleError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


class _BinUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase):
        super().__init__(file, encoding="bytes")

    def find_class(self, module: str, name: str) -> object:
        if module.startswith("numpy.core."):
            module = "numpy._core." + module[len("numpy.core."):]
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise RefusedPickleError(f"{module}.{name}")


def read_bin(path: Path) -> tuple[list, list]:
    with open(path, "rb") as handle:
        try:
            data = _BinUnpickler(handle).load()
        except RefusedPickleError as exc:
            raise RefusedPickleError(
                f"{path} references {exc}; a verification .bin may only hold lists of image bytes and "
                "booleans, so it was refused (nothing was executed)") from None
        except Exception as exc:  # a damaged or truncated pickle raises many types, UnpicklingError included
            raise InvalidInputError(f"cannot read verification file {path}: {exc}") from exc
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise InvalidInputError(f"{path}: expected a pickle of (images, issame), got {type(data).__name__}")
    images, issame = data
    if not isinstance(images, (list, tuple)) or not isinstance(issame, (list, tuple, np.ndarray)):
        raise InvalidInputError(f"{path}: expected (list of images, list of bools)")
    return list(images), list(issame)


def write_bin(path: str | Path, jpeg_list: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write an insightface-style ``.bin`` (pickle of (list of bytes, list of bool)) atomically."""
    if len(jpeg_list) != 2 * len(issame):
        raise InvalidInputError(f"{len(jpeg_list)} images for {len(issame)} pairs (expected two per pair)")
    payload = ([bytes(item) for item in jpeg_list], [bool(flag) for flag in issame])
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            pickle.dump(payload, handle, protocol=_BIN_PROTOCOL)

"""5-point face alignment to the ArcFace template, and the guard against unaligned inputs.

Every network of this project expects the crops insightface's ``face_align.norm_crop`` makes: the five
landmarks (left eye, right eye, nose tip, left and right mouth corners, in image coordinates, "left"
meaning the left of the picture) mapped onto fixed template points of a 112x112 crop by the least-squares
similarity transform (rotation, uniform scale, translation; Umeyama's estimator as implemented by
scikit-image's ``SimilarityTransform``), then ``cv2.warpAffine`` with a black border.

Other crop sizes follow insightface's rule: a multiple of 128 uses the 128-pixel convention (template
scaled by size / 128 and shifted right by 8 * size / 128); any other size scales the 112 template by
size / 112 (exact for multiples of 112, and the natural choice for the small sizes of tests and demos).
"""
from __future__ import annotations

import cv2
import numpy as np

from utils.core.errors import InvalidInputError

# The ArcFace template for a 112x112 crop: (x, y) of left eye, right eye, nose, left/right mouth corner.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)


class UnalignedImageError(InvalidInputError):
    """An image is not an ``input_size`` square and nothing says how to align it."""


def template(size: int) -> np.ndarray:
    """The five template points ``[5, 2]`` for a ``size`` x ``size`` crop (module doc for the rule)."""
    if size <= 0:
        raise ValueError(f"crop size must be positive, got {size}")
    if size % 128 == 0:
        ratio = size / 128.0
        points = ARCFACE_TEMPLATE * ratio
        points[:, 0] += 8.0 * ratio
        return points
    return ARCFACE_TEMPLATE * (size / 112.0)


def as_landmarks(values: np.ndarray | list[float], name: str = "landmarks") -> np.ndarray:
    """Five (x, y) points as float64 ``[5, 2]`` from 10 numbers or a [5, 2] array; anything else is refused."""
    points = np.asarray(values, dtype=np.float64)
    if points.size != 10:
        raise ValueError(f"{name}: expected 5 landmark points (10 numbers), got {points.size} numbers")
    points = points.reshape(5, 2)
    if not np.isfinite(points).all():
        raise ValueError(f"{name}: landmarks contain NaN or inf")
    return points


def estimate_transform(landmarks: np.ndarray, size: int) -> np.ndarray:
    """The 2x3 affine matrix of the similarity transform that maps ``landmarks`` onto ``template(size)``."""
    points = as_landmarks(landmarks)
    # Imported here: scikit-image (with scipy) costs every stage process 0.1-0.2 s of start-up, and only
    # unaligned inputs need it.
    from skimage.transform import SimilarityTransform

    transform = SimilarityTransform.from_estimate(points, template(size))
    ok = bool(transform)  # a failed estimate is falsy
    if not ok or not np.isfinite(transform.params).all():
        raise ValueError(f"cannot estimate an alignment from degenerate landmarks {points.tolist()}")
    return np.asarray(transform.params[:2], dtype=np.float64)


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """The ``size`` x ``size`` aligned crop of ``image`` (any channel order, kept) from its 5 landmarks."""
    matrix = estimate_transform(landmarks, size)
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=0.0)


def check_input_size(image: np.ndarray, input_size: int, name: str, allow_resize: bool) -> np.ndarray:
    """``image`` as an ``input_size`` square: as it is when it already is one, resized on purpose with
    ``allow_resize``, refused otherwise (resizing an unaligned photo silently gives wrong numbers)."""
    height, width = image.shape[:2]
    if height == width == input_size:
        return image
    if not allow_resize:
        raise UnalignedImageError(
            f"image {name} is {width}x{height}, not the {input_size}x{input_size} aligned crop the networks "
            f"expect: align the images to the ArcFace template first (5-point landmarks; utils/data/align.py, or "
            f"RFW's <Race>_lmk.txt files, which are used automatically), or set allow_resize=True to resize "
            f"them on purpose (only right for images that are already aligned crops of another size)")
    shrink = height > input_size or width > input_size
    return cv2.resize(image, (input_size, input_size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)

"""Image decoding, the one input normalisation of every network, and the training flip."""
from __future__ import annotations

import cv2
import numpy as np
import torch

from config.config import MAX_IMAGE_PIXELS
from utils.core.errors import InvalidInputError
from utils.data.align import check_input_size
from utils.data.image_header import check_pixels


def decode_bgr(data: bytes | np.ndarray, name: str, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Encoded image -> BGR uint8 [H, W, 3] at its own size; ``name`` (file or record) appears in errors. An
    image whose header claims more than ``max_pixels`` pixels is refused before decoding."""
    buffer = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    check_pixels(buffer, name, max_pixels)
    image = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    if image is None:
        raise InvalidInputError(f"cannot decode image {name}: corrupt, truncated or not an image")
    return image


def decode_image(data: bytes | np.ndarray, input_size: int, name: str, allow_resize: bool = False,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Encoded aligned crop -> RGB uint8 [S, S, 3]. An image of another size is refused unless
    ``allow_resize`` (see :func:`utils.data.align.check_input_size`), one above ``max_pixels`` always."""
    image = check_input_size(decode_bgr(data, name, max_pixels), input_size, name, allow_resize)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """RGB uint8 [H, W, 3] -> uint8 tensor [3, H, W]."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def normalize_array(image: np.ndarray) -> np.ndarray:
    """uint8 RGB (any shape) -> float32 (x / 255 - 0.5) / 0.5, the network input of every stage.

    numpy, not torch: per-item torch ops in a data loader go through the intra-op thread pool, which is
    slow in a busy main process; the float32 operations are the same as :func:`normalize_images`.
    """
    return (image.astype(np.float32) / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB image tensors -> float (x / 255 - 0.5) / 0.5 (batched twin of :func:`normalize_array`)."""
    return (images.float() / 255.0 - 0.5) / 0.5


def random_horizontal_flip(images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each image of a [B, 3, H, W] batch with probability 0.5; returns the batch and the flags."""
    flags = torch.rand(images.shape[0], generator=generator, device=generator.device) < 0.5
    flags = flags.to(images.device)
    return torch.where(flags[:, None, None, None], images.flip(3), images), flags

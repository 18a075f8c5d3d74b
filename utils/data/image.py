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


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB image tensors -> float32 (x / 255 - 0.5) / 0.5, the network input of every stage, on the images'
    device. The divisor is a tensor on that device: CUDA divides by a host scalar as a multiplication by its
    reciprocal, which can differ from x / 255 in the last bit; a true division gives the numpy float32 result."""
    divisor = torch.full((), 255.0, dtype=torch.float32, device=images.device)
    return (images.float() / divisor - 0.5) / 0.5


def draw_flips(count: int, generator: torch.Generator) -> torch.Tensor:
    """Which of ``count`` images the training flip mirrors (probability 0.5 each), drawn on ``generator``'s device
    (the CPU in training, so a resumed run draws the same flips)."""
    return torch.rand(count, generator=generator, device=generator.device) < 0.5


def flip_images(images: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """Mirror the images of a [B, C, H, W] batch whose ``flags`` are set (flags on the images' device)."""
    return torch.where(flags[:, None, None, None], images.flip(3), images)


def network_input(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """A batch as the network takes it: uint8 images normalised (float ones, already normalised, as they are),
    NHWC in memory when ``channels_last``."""
    if images.dtype == torch.uint8:
        images = normalize_images(images)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images

"""Embed a folder of aligned face crops (or an insightface ``.bin``) with one backbone.

    python -m eval.embed --backbone student.pth --network iresnet34 --images DIR_OR_FILE.bin --out OUT [--flip]

writes ``OUT/embeddings.npy``, a float32 ``[N, E]`` array of L2-normalised embeddings (open it with
``np.load(path, mmap_mode="r")``), and ``OUT/rows.tsv``, one line per row: the row number and the image (its
path relative to the folder, or ``<file>.bin[i]``). Folders are walked recursively in sorted order; images must be
aligned ``--input-size`` squares (``utils/data/align.py``) unless ``--allow-resize``. ``--flip`` adds the embedding
of the mirrored image before normalising (the test-time augmentation of the verification protocol).
Both files are written under temporary names and renamed when complete; the row list is written last.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from backbones import BACKBONES, get_backbone
from config.config import MAX_IMAGE_PIXELS
from eval.rfw.embedding import backbone_embed_fn, embed_images
from eval.rfw.pairs import load_bin
from utils.core.distributed import default_device
from utils.core.errors import InvalidInputError, MissingInputError
from utils.core.io import atomic_path, atomic_write_text, create_array, output_folder
from utils.core.weights import load_weights
from utils.data.image import decode_image
from utils.data.index import IMAGE_EXTENSIONS
from utils.stages.cli import add_max_image_pixels, run_tool

EMBEDDINGS_NAME, ROWS_NAME = "embeddings.npy", "rows.tsv"


def list_images(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (recursive, hidden entries skipped), sorted by relative path."""
    paths = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    if not paths:
        raise MissingInputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    return sorted(paths, key=lambda p: p.relative_to(folder).as_posix())


def _folder_batches(paths: Sequence[Path], input_size: int, batch_size: int, allow_resize: bool,
                    max_pixels: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        out = np.empty((len(chunk), 3, input_size, input_size), dtype=np.uint8)
        for i, path in enumerate(chunk):
            out[i] = decode_image(path.read_bytes(), input_size, str(path), allow_resize,
                                  max_pixels).transpose(2, 0, 1)
        yield torch.from_numpy(out)


def embed_source(model: torch.nn.Module, source: str | Path, out_dir: str | Path, *, input_size: int,
                 flip: bool = False, batch_size: int = 256, device: str | torch.device = "cpu",
                 allow_resize: bool = False, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[Path, Path]:
    """Embeddings of every image of ``source`` (a folder of aligned crops or a ``.bin``) into ``out_dir``; an image
    whose header claims more than ``max_pixels`` pixels is refused before decoding.

    Returns the paths of ``embeddings.npy`` and ``rows.tsv``.
    """
    source, out_dir = Path(source), Path(out_dir)
    if source.is_dir():
        paths = list_images(source)
        names = [p.relative_to(source).as_posix() for p in paths]
        batches: Iterator[torch.Tensor] = _folder_batches(paths, input_size, batch_size, allow_resize, max_pixels)
    elif source.is_file() and source.suffix == ".bin":
        images, _ = load_bin(source, input_size, allow_resize, max_pixels)
        names = [f"{source.name}[{i}]" for i in range(images.shape[0])]
        batches = (images[start:start + batch_size] for start in range(0, images.shape[0], batch_size))
    else:
        raise MissingInputError(f"--images {source}: expected a folder of aligned images or an insightface .bin file")
    model = model.to(device)
    embed_fn = backbone_embed_fn(model)
    embeddings_path, rows_path = out_dir / EMBEDDINGS_NAME, out_dir / ROWS_NAME
    rows_path.unlink(missing_ok=True)  # a row list next to a half-written array would claim it complete
    with atomic_path(embeddings_path) as partial:
        array = None
        row = 0
        for batch in batches:
            rows = embed_images(embed_fn, batch, batch_size=batch_size, device=device, flip=flip)
            if array is None:
                array = create_array(partial, (len(names), rows.shape[1]))
            array[row:row + len(rows)] = rows
            row += len(rows)
        if array is None:
            raise InvalidInputError(f"no images to embed in {source}")
        array.flush()
        del array  # closes the memory map before the rename
    atomic_write_text(rows_path, "".join(f"{i}\t{name}\n" for i, name in enumerate(names)))
    return embeddings_path, rows_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval.embed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", type=Path, required=True, metavar="PATH", help="backbone weights file")
    parser.add_argument("--network", default="iresnet34", choices=BACKBONES)
    parser.add_argument("--images", type=Path, required=True, metavar="DIR|FILE.bin",
                        help="a folder of aligned face crops, or an insightface verification .bin")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="output folder (embeddings.npy and the row list)")
    parser.add_argument("--flip", action="store_true", help="flip test-time augmentation")
    parser.add_argument("--input-size", type=int, default=112)
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--width", type=int, default=64, help="backbone base width (64 = paper networks)")
    parser.add_argument("--use-se", action="store_true")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--allow-resize", action="store_true",
                        help="resize images that are not --input-size squares instead of refusing them as unaligned")
    add_max_image_pixels(parser)
    return parser


def _run(args: argparse.Namespace) -> tuple[Path, Path]:
    if args.batch_size < 1:
        raise InvalidInputError(f"--batch-size {args.batch_size}: give a number >= 1")
    with output_folder(args.out) as out:  # checked before the weights load and the images are read
        device = torch.device(args.device) if args.device else default_device()
        model = get_backbone(args.network, input_size=args.input_size, embedding_size=args.embedding_size,
                             use_se=args.use_se, width=args.width)
        load_weights(model, args.backbone, what=f"{args.network} backbone weights")
        paths = embed_source(model, args.images, out, input_size=args.input_size, flip=args.flip,
                             batch_size=args.batch_size, device=device, allow_resize=args.allow_resize,
                             max_pixels=args.max_image_pixels)
    print(f"wrote {paths[0]} and {paths[1]}")
    return paths


def main(argv: Sequence[str] | None = None) -> tuple[Path, Path]:
    args = build_parser().parse_args(argv)
    return run_tool(lambda: _run(args))


if __name__ == "__main__":
    main()

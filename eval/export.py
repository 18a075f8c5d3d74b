"""Export a trained backbone (a student above all; any iResNet or MobileFaceNet) to ONNX and check it.

The ONNX model takes ``images`` [batch, 3, S, S] float32 RGB normalised as in training, (x / 255 - 0.5) / 0.5,
with a dynamic batch axis, and returns ``embeddings`` [batch, E] (not L2-normalised). After writing it, the
export runs onnxruntime against PyTorch on random and on real images and refuses (deleting the file) when they
disagree by more than ``--tolerance`` on the L2-normalised embeddings. ``<out>.json`` beside the model records the
source weights' sha256, the architecture, the input convention and the measured differences.

Examples:
  python -m eval.export --weights work_dirs/students/SL_aKD_iresnet18/best_backbone.pth --out student.onnx
      (network, sizes and a folder of real images are read from the run's config.json)
  python -m eval.export --weights mbf.pth --network mobilefacenet --embedding-size 512 --images faces/ --out m.onnx
"""
from __future__ import annotations

import argparse
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from backbones import BACKBONES, get_backbone
from config.config import MAX_IMAGE_PIXELS
from utils.core.digests import file_sha256
from utils.core.errors import IncompatibleInputError, InvalidInputError, MissingInputError
from utils.core.io import atomic_path, atomic_write_json, output_folder
from utils.core.weights import load_weights
from utils.data.image import decode_image, normalize_images, to_tensor
from utils.data.index import IMAGE_EXTENSIONS
from utils.stages.cli import add_max_image_pixels, run_tool
from utils.workdir import artifacts
from utils.workdir.runs import read_run_config

INPUT_NAME, OUTPUT_NAME = "images", "embeddings"
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass
class Architecture:
    network: str
    input_size: int = 112
    embedding_size: int = 512
    width: int = 64
    use_se: bool = False

    def build(self) -> nn.Module:
        return get_backbone(self.network, input_size=self.input_size, embedding_size=self.embedding_size,
                            width=self.width, use_se=self.use_se)


def run_architecture(weights: Path) -> tuple[Architecture, Path | None]:
    """The backbone of the training run that wrote ``weights`` (its config.json) and the run's data folder."""
    config = artifacts.config_file(weights.parent)
    if not config.is_file():
        raise MissingInputError(f"no {config} beside {weights}: pass --network (and the sizes) for weights "
                                f"that were not written by a training run")
    cfg, stage = read_run_config(weights.parent)
    if stage not in ("teacher", "student"):
        raise InvalidInputError(f"{config} is a {stage or 'non-training'} run; only teacher and student backbones export")
    network = cfg.student_network if stage == "student" else cfg.network
    arch = Architecture(network, cfg.input_size, cfg.embedding_size, cfg.width, cfg.use_se)
    return arch, Path(cfg.data_root) if cfg.data_root else None


def find_images(paths: Sequence[Path], limit: int) -> list[Path]:
    """Up to ``limit`` image files: the files given, then those found under the folders given (sorted)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS))
        elif path.is_file():
            found.append(path)
        else:
            raise MissingInputError(f"image path {path} does not exist")
        if len(found) >= limit:
            break
    return found[:limit]


def load_images(files: Sequence[Path], input_size: int, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Image files -> the network input [N, 3, S, S], decoded and normalised as in training (an image whose header
    claims more than ``max_pixels`` pixels is refused before decoding)."""
    images = [to_tensor(decode_image(np.fromfile(path, dtype=np.uint8), input_size, str(path), max_pixels=max_pixels))
              for path in files]
    return normalize_images(torch.stack(images))


def _differences(session: Any, model: nn.Module, images: torch.Tensor, weights: Path) -> dict[str, float]:
    """Largest raw and L2-normalised differences of the two runtimes' embeddings, computed in float64: in float32
    the norms of outputs near 1e20 overflow and a broken model would compare equal to itself."""
    with torch.no_grad():
        expected = model(images).double()
    actual = torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]).double()
    if actual.shape != expected.shape:
        raise RuntimeError(f"ONNX output shape {tuple(actual.shape)} != PyTorch {tuple(expected.shape)}")
    for runtime, outputs in (("PyTorch", expected), ("ONNX", actual)):
        # Whoever uses the model normalises float32 embeddings: a squared norm past float32 is inf there.
        largest = float(outputs.norm(dim=1).max())
        if not largest ** 2 <= FLOAT32_MAX:
            raise IncompatibleInputError(
                f"{weights}: {runtime} embeddings are not finite or overflow float32 when normalised (largest norm "
                f"{largest:.3g}); the model is broken, nothing exported")
    return {
        "images": len(images),
        "max_abs_diff": float((actual - expected).abs().max()),
        "max_abs_diff_normalised": float((F.normalize(actual, dim=1) - F.normalize(expected, dim=1)).abs().max()),
    }


def export_backbone(weights: Path, out: Path, arch: Architecture, *, real_images: torch.Tensor | None,
                    tolerance: float = 1e-4, seed: int = 0) -> dict[str, Any]:
    """Write ``weights`` as ONNX to ``out``, check it with onnxruntime, record the check in ``out``.json."""
    import onnx
    import onnxruntime

    model = load_weights(arch.build(), weights, what=f"{arch.network} backbone weights").eval()
    example = torch.zeros(2, 3, arch.input_size, arch.input_size)
    with atomic_path(out) as tmp:
        # onnx files are written by name; the temporary file keeps a half-written model from landing at `out`.
        onnx_tmp = tmp.with_suffix(".onnx")
        try:
            # The TorchScript exporter of the pinned torch: these convolutional nets trace exactly, and it runs in
            # a second where the torch.export-based one takes ten (and needs onnxscript). A torch that drops it
            # fails here loudly; then switch to dynamo=True with dynamic_shapes.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.onnx.export(model, (example,), str(onnx_tmp), input_names=[INPUT_NAME],
                                  output_names=[OUTPUT_NAME], dynamo=False,
                                  dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
            onnx.checker.check_model(str(onnx_tmp), full_check=True)
            session = onnxruntime.InferenceSession(str(onnx_tmp), providers=["CPUExecutionProvider"])
            generator = torch.Generator().manual_seed(seed)
            checks = {"random": _differences(session, model, torch.randn(
                5, 3, arch.input_size, arch.input_size, generator=generator), weights)}
            if real_images is not None:
                checks["real"] = _differences(session, model, real_images, weights)
            worst = max(check["max_abs_diff_normalised"] for check in checks.values())
            if not worst <= tolerance:
                raise IncompatibleInputError(f"ONNX and PyTorch embeddings of {weights} differ by {worst:.3g} "
                                             f"(normalised) > tolerance {tolerance:g}; not writing {out}")
            onnx_tmp.replace(tmp)
        finally:
            onnx_tmp.unlink(missing_ok=True)
    record = {
        "onnx": out.name,
        "source_weights": str(weights),
        "source_sha256": file_sha256(weights),
        "architecture": asdict(arch),
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, arch.input_size, arch.input_size],
                  "format": "float32 RGB, (pixel / 255 - 0.5) / 0.5"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", arch.embedding_size],
                   "format": "float32 embedding, not normalised: L2-normalise, then compare by cosine"},
        "check": {"runtime": f"onnxruntime {onnxruntime.__version__} (CPU)", "tolerance": tolerance, **checks},
        "torch": torch.__version__,
    }
    atomic_write_json(out.with_name(out.name + ".json"), record)
    return record


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, required=True, help="backbone weights, e.g. the best weights of a training run")
    parser.add_argument("--out", type=Path, required=True, help="ONNX file to write (<out>.json is written beside)")
    parser.add_argument("--network", choices=BACKBONES,
                        help="architecture; default: read from the config of the run folder holding --weights")
    parser.add_argument("--input-size", type=int, default=112, help="with --network: image side")
    parser.add_argument("--embedding-size", type=int, default=512, help="with --network")
    parser.add_argument("--width", type=int, default=64, help="with --network: base width (64 = paper networks)")
    parser.add_argument("--use-se", action="store_true", help="with --network: iResNet with SE blocks")
    parser.add_argument("--images", type=Path, nargs="+", metavar="PATH",
                        help="real images (files or folders) for the check; default: the run's data_root")
    parser.add_argument("--num-images", type=int, default=16, help="how many real images to check")
    add_max_image_pixels(parser)
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest accepted difference of the L2-normalised embeddings")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    if not args.tolerance >= 0:
        raise InvalidInputError(f"--tolerance {args.tolerance}: give a difference >= 0")
    if args.num_images < 1:
        raise InvalidInputError(f"--num-images {args.num_images}: give a number >= 1")


def _run(args: argparse.Namespace) -> dict[str, Any]:
    _check_args(args)
    with output_folder(args.out.parent):  # checked writable before the weights and images are read
        data_root = None
        if args.network is None:
            arch, data_root = run_architecture(args.weights)
        else:
            arch = Architecture(args.network, args.input_size, args.embedding_size, args.width, args.use_se)
        image_paths = args.images or ([data_root] if data_root is not None and data_root.is_dir() else [])
        files = find_images(image_paths, args.num_images)
        if not files:
            raise MissingInputError("no real images to check the export on: pass --images FILES_OR_FOLDERS")
        real_images = load_images(files, arch.input_size, args.max_image_pixels)
        record = export_backbone(args.weights, args.out, arch, real_images=real_images, tolerance=args.tolerance)
    checks = "; ".join(f"{name} images ({check['images']}): max |diff| {check['max_abs_diff']:.2e}, normalised "
                       f"{check['max_abs_diff_normalised']:.2e}" for name, check in record["check"].items()
                       if isinstance(check, dict))
    print(f"wrote {args.out} ({arch.network}, sha256 of {args.weights.name} {record['source_sha256'][:12]}...): "
          f"{checks}")
    return record


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    return run_tool(lambda: _run(args))


if __name__ == "__main__":
    main()

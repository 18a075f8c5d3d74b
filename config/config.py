"""The single place for every default of the MST-KD pipeline.

Stage scripts call :func:`parse_cli` (``key=value`` overrides, values parsed as Python literals) and get a
:class:`Config`. Derived values (scaled learning rates) are properties computed from the final values, so
importing this module does nothing and an override always reaches them; run directories are derived from a
Config in ``utils/workdir/artifacts.py``.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

ETHNICITIES = ("African", "Asian", "Caucasian", "Indian")
# The released adaptors were trained on this concatenation order; it must never change.
CONCAT_ORDER = ("Asian", "African", "Caucasian", "Indian")
NUM_BASELINE_SPLITS = 4
# The release names balanced split k after ETHNICITIES[k] and feeds the baseline teachers through the same
# CONCAT_ORDER, so the adaptor's blocks are splits 1, 0, 2, 3; the released baseline adaptors need that order.
BASELINE_CONCAT_ORDER = tuple(f"split{ETHNICITIES.index(name)}" for name in CONCAT_ORDER)
TEACHER_SETS = ("specialized", "baseline")
ADAPTORS = ("SL", "DuL", "DLDPO")
KD_KINDS = ("aKD", "EAFKD")
AMP_MODES = ("none", "bf16", "fp16")
# The stage script (and its fixed overrides) that produces each adaptor and each kind of student.
ADAPTOR_SCRIPTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "SL": ("fc_EArc.py", ()),
    "DuL": ("dual_layer_EAF-Fusion.py", ("has_drop_out=False",)),
    "DLDPO": ("dual_layer_EAF-Fusion.py", ("has_drop_out=True",)),
}
KD_SCRIPTS = {"aKD": "KD_alone.py", "EAFKD": "KD_CEL.py"}
KD_LABELS = {"aKD": "a-KD", "EAFKD": "EAF-KD"}  # as the paper's tables name them
# Default of max_image_pixels, also the limit of the tools that decode images without a config.
MAX_IMAGE_PIXELS = 40_000_000

# Default margin-head hyperparameters per loss (s, m, std); `s`, `m`, `std` keys override them for `loss`.
# As in the release's config, except CosFace: the release has no CosFace branch (it would get m = 0.5).
MARGIN_DEFAULTS: dict[str, dict[str, float]] = {
    "ElasticArcFace": {"s": 64.0, "m": 0.5, "std": 0.05},
    "ElasticArcFacePlus": {"s": 64.0, "m": 0.5, "std": 0.0175},
    "ElasticCosFace": {"s": 64.0, "m": 0.35, "std": 0.05},
    "ElasticCosFacePlus": {"s": 64.0, "m": 0.35, "std": 0.02},
    "ArcFace": {"s": 64.0, "m": 0.5, "std": 0.0},
    "CosFace": {"s": 64.0, "m": 0.35, "std": 0.0},
    "CurricularFace": {"s": 64.0, "m": 0.5, "std": 0.0},
}


@dataclass
class Config:
    # ---- data -------------------------------------------------------------------------------------------
    data_root: str | None = None  # BUPT-BalancedFace root (ROOT/<Ethnicity>/<identity>/<img>) or a folder with train.rec/train.idx
    rfw_root: str | None = None  # RFW: folder of <Ethnicity>_test.bin, or the archive root / its test/; None = no verification
    val_targets: list[str] = field(default_factory=list)  # insightface .bin benchmarks verified with RFW (lfw, cfp_fp, ...)
    val_root: str | None = None  # folder holding <name>.bin of every val_targets name
    output_root: str = "work_dirs"  # every run, store and report lives under this folder
    run_name: str = ""  # appended to run, store and report folder names so ablations live side by side
    ids_per_ethnicity: int | None = None  # use a seeded random subset of k identities per ethnicity (None = all)
    input_size: int = 112  # square input side in pixels of the aligned crops
    allow_resize: bool = False  # resize images that are not input_size squares (default: refuse them as unaligned)
    num_workers: int = 4  # data-loader worker processes per rank
    max_image_pixels: int = MAX_IMAGE_PIXELS  # an image whose header claims more pixels is refused before decoding
    check_images: int = 1000  # images decoded as a sanity pass before training (0 = none, -1 = all; extraction: all)
    # ---- what to train ----------------------------------------------------------------------------------
    ethnicity: str = "African"  # specialized teacher / extraction target: African|Asian|Caucasian|Indian|all
    teacher_set: str = "specialized"  # specialized (one ethnicity each) | baseline (balanced splits)
    split: int = 0  # which balanced baseline split (0..3) when teacher_set=baseline
    network: str = "iresnet34"  # teacher backbone
    student_network: str = "iresnet34"  # student backbone
    use_se: bool = False  # squeeze-and-excitation blocks in the iResNets
    dropout: float | None = None  # dropout before the backbone FC; None = network default (0.4 for iresnet50)
    width: int = 64  # base channel width of the backbone (64 for the paper; smaller only for demos)
    embedding_size: int = 512  # embedding dimension of every backbone and adaptor
    # ---- optimisation (teachers and students) -----------------------------------------------------------
    batch_size: int = 128  # images per GPU (per rank)
    lr: float = 0.1  # base lr for teachers and students, scaled by batch_size * world_size / 512
    momentum: float = 0.9  # SGD momentum (every stage)
    weight_decay: float = 5e-4  # SGD weight decay (every stage)
    num_epoch: int = 52  # epochs for teachers and students
    milestones: list[int] = field(default_factory=lambda: [16, 28, 40, 50])  # lr x lr_decay from the m-th epoch on, counting from 1 (release)
    lr_decay: float = 0.1  # step-decay factor
    grad_clip: float = 5.0  # max grad-norm on the backbone/adaptor (never the header)
    # ---- margin head ------------------------------------------------------------------------------------
    loss: str = "ElasticArcFace"  # margin head: see MARGIN_DEFAULTS for the names
    s: float | None = None  # scale; None = the loss default
    m: float | None = None  # margin; None = the loss default
    std: float | None = None  # margin std for the elastic heads; None = the loss default (0.05 for EAF)
    # ---- adaptors ---------------------------------------------------------------------------------------
    adaptor: str = "SL"  # SL | DuL | DLDPO (which adaptor a stage trains or reads targets from)
    has_drop_out: bool = False  # dual_layer_EAF-Fusion.py: False trains DuL, True trains DLDPO (release name)
    lr_fc: float = 1.0  # base lr for adaptors, scaled like lr
    num_epoch_fc: int = 26  # adaptor epochs
    milestones_fc: list[int] = field(default_factory=lambda: [16])  # as milestones: 15 epochs at lr_fc, 11 at a tenth (the release's lr_func)
    adaptor_loss: str = "ElasticArcFace"  # margin head of the adaptor stage, with its MARGIN_DEFAULTS s and m (release)
    adaptor_std: float = 0.0125  # margin std of an elastic adaptor_loss (release value)
    batch_size_fc: int = 128  # adaptor samples per rank and step
    middle_layer_size: int = 512  # hidden width of the dual-layer adaptors
    adaptor_dropout: float = 0.2  # dropout of DLDPO between its two layers
    adaptor_negative_slope: float = 0.01  # LeakyReLU slope of the dual-layer adaptors
    store_in_memory: bool = True  # load teacher stores into RAM for the adaptor (False = read the memory map)
    # ---- knowledge distillation -------------------------------------------------------------------------
    kd: str = "aKD"  # aKD (KD alone) | EAFKD (ElasticArcFace + KD); set by KD_alone.py / KD_CEL.py
    loss_lambda: float = 10000.0  # weight of the KD MSE term
    kd_flip_consistent: bool = False  # pair flipped images with flipped-image targets (release: False)
    # ---- extraction -------------------------------------------------------------------------------------
    extract_flipped: bool = False  # also store embeddings of flipped images (needed by kd_flip_consistent)
    extract_batch_size: int = 256  # images per rank and forward pass during extraction and evaluation
    # ---- run control ------------------------------------------------------------------------------------
    seed: int = 0  # seeds python, numpy, torch, the sampler, flips and margins (per rank)
    amp: str = "none"  # none | bf16 | fp16 autocast, on GPU and CPU (margin and loss maths stay fp32)
    amp_init_scale: float = 65536.0  # fp16 only: the GradScaler's first loss scale (PyTorch's default, 2**16)
    log_every: int = 50  # steps between log lines and TensorBoard points
    channels_last: bool = True  # NHWC images and conv weights on CUDA (ignored on the CPU)
    cudnn_benchmark: bool = True  # let cuDNN time its kernels for the fixed input size (CUDA only)
    compile: bool = False  # torch.compile the trained model (off: not measured to win yet; see README)
    verify_every: int = 1  # epochs between RFW verifications when rfw_root is set (the last epoch always)
    # ---- report statistics (eval/metrics/bootstrap.py, eval/metrics/operating_point.py) ----------------------------------
    bootstrap_resamples: int = 1000  # bootstrap resamples of the RFW pairs for intervals and paired comparisons
    bootstrap_seed: int = 0  # seed of the resampling plan (same seed = same intervals)
    confidence: float = 0.95  # level of the bootstrap percentile intervals
    fmr_targets: list[float] = field(default_factory=lambda: [1e-3, 1e-2])  # pooled FMRs that set the global thresholds
    fdr_alpha: float = 0.5  # weight of the FMR gap in the Fairness Discrepancy Rate (1 - alpha: FNMR gap)
    resume: bool = False  # continue from checkpoint_last.pt of this run
    replace: bool = False  # a run folder made under other settings or inputs is moved aside, not refused
    resume_same_world_size: bool = False  # refuse to resume under a different world size
    init_weights: str | None = None  # start the model from these weights (no optimiser state)
    stop_after_epoch: int | None = None  # end this process after that many epochs (to split a run)
    keep_epoch_weights: bool = True  # keep every epoch's weights files, not just best and last
    split_materialize: bool = False  # baseline_data_split.py: also build per-split folders with hard links
    split_overwrite: bool = False  # baseline_data_split.py: replace an existing different split
    num_classes: int | None = None  # derived from the data by the stage; setting it checks the data

    # ---- derived values -------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return torchrun_launch().world_size

    @property
    def scaled_lr(self) -> float:
        """Teacher/student lr: base_lr / 512 * batch_per_gpu * world_size (the paper's linear rule)."""
        return self.lr / 512 * self.batch_size * self.world_size

    @property
    def scaled_lr_fc(self) -> float:
        return self.lr_fc / 512 * self.batch_size_fc * self.world_size

    def margin_loss(self, adaptor_stage: bool = False) -> str:
        """The margin head of a stage: ``adaptor_loss`` for adaptors, whatever ``loss`` the others use."""
        return self.adaptor_loss if adaptor_stage else self.loss

    def margin_params(self, adaptor_stage: bool = False) -> dict[str, float]:
        """s, m, std of the stage's head; the ``s``/``m``/``std`` keys apply to ``loss``, ``adaptor_std`` to adaptors."""
        params = dict(MARGIN_DEFAULTS[self.margin_loss(adaptor_stage)])
        if adaptor_stage:
            params["std"] = float(self.adaptor_std)
            return params
        for key in ("s", "m", "std"):
            value = getattr(self, key)
            if value is not None:
                params[key] = float(value)
        return params

    @property
    def teacher_member(self) -> str:
        """Name of the teacher this config points at: an ethnicity, or ``split<k>`` for baseline teachers."""
        return teacher_member(self.teacher_set, self.ethnicity, self.split)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["derived"] = {
            "world_size": self.world_size,
            "scaled_lr": self.scaled_lr,
            "scaled_lr_fc": self.scaled_lr_fc,
            "teacher_member": self.teacher_member,
        }
        return data


@dataclass(frozen=True)
class Launch:
    """What torchrun tells each process it starts (a plain run is rank 0 of 1). Read only by
    :func:`torchrun_launch`, so that the linear lr rule and the process group see the same world size."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int  # processes of this job on this node


def torchrun_launch() -> Launch:
    env = os.environ
    return Launch(rank=int(env.get("RANK", "0")), local_rank=int(env.get("LOCAL_RANK", "0")),
                  world_size=int(env.get("WORLD_SIZE", "1")), local_world_size=int(env.get("LOCAL_WORLD_SIZE", "1")))


def teacher_members(teacher_set: str) -> list[str]:
    """The four teachers of a set, in adaptor concatenation order (every concatenation uses this)."""
    if teacher_set == "specialized":
        return list(CONCAT_ORDER)
    if teacher_set == "baseline":
        return list(BASELINE_CONCAT_ORDER)
    raise ValueError(f"teacher_set must be one of {TEACHER_SETS}, got {teacher_set!r}")


def teacher_member(teacher_set: str, ethnicity: str, split: int) -> str:
    if teacher_set == "baseline":
        return f"split{split}"
    return ethnicity


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        # Bare words (paths, names) are strings; `None`/`True`/numbers went through literal_eval above.
        return text


def format_override(key: str, value: Any) -> str:
    """``key=value`` text that parses back to ``value``: bare words where they round-trip, literals otherwise."""
    text = str(value)
    return f"{key}={text}" if isinstance(value, str) and _parse_value(text) == value else f"{key}={value!r}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Range of every numeric key: (test, what it must be). Keys absent here only need their type.
_POSITIVE = (lambda v: v > 0, "> 0")
_NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
_PROBABILITY = (lambda v: 0 <= v < 1, "in [0, 1)")
_RANGES: dict[str, tuple[Any, str]] = {
    "ids_per_ethnicity": _POSITIVE, "input_size": _POSITIVE, "max_image_pixels": _POSITIVE, "num_workers": _NON_NEGATIVE,
    "check_images": (lambda v: v >= -1, ">= -1"),
    "split": (lambda v: 0 <= v < NUM_BASELINE_SPLITS, f"in 0..{NUM_BASELINE_SPLITS - 1}"),
    "dropout": _PROBABILITY, "width": _POSITIVE, "embedding_size": _POSITIVE,
    "batch_size": _POSITIVE, "lr": _POSITIVE, "momentum": _PROBABILITY, "weight_decay": _NON_NEGATIVE,
    "num_epoch": _POSITIVE, "lr_decay": (lambda v: 0 < v <= 1, "in (0, 1]"), "grad_clip": _POSITIVE,
    "s": _POSITIVE, "m": _NON_NEGATIVE, "std": _NON_NEGATIVE,
    "lr_fc": _POSITIVE, "num_epoch_fc": _POSITIVE, "adaptor_std": _NON_NEGATIVE, "batch_size_fc": _POSITIVE,
    "middle_layer_size": _POSITIVE, "adaptor_dropout": _PROBABILITY, "adaptor_negative_slope": _NON_NEGATIVE,
    "loss_lambda": _NON_NEGATIVE, "extract_batch_size": _POSITIVE,
    "seed": (lambda v: 0 <= v < 2**32, "in 0..2**32-1"), "log_every": _POSITIVE, "verify_every": _POSITIVE,
    "stop_after_epoch": _NON_NEGATIVE, "num_classes": _POSITIVE, "output_root": (bool, "a folder name"),
    "amp_init_scale": _POSITIVE, "bootstrap_resamples": _POSITIVE, "bootstrap_seed": _NON_NEGATIVE,
    "confidence": (lambda v: 0 < v < 1, "in (0, 1)"), "fdr_alpha": (lambda v: 0 <= v <= 1, "in [0, 1]"),
}


def _type_problem(annotation: str, value: Any) -> str | None:
    """Why ``value`` does not fit the field annotation (``float``, ``int | None``, ``list[int]``...); None if it
    does. Floats must be finite: ``nan`` and ``inf`` are never a valid setting."""
    kinds = [part.strip() for part in annotation.split("|")]
    if value is None:
        return None if "None" in kinds else "must not be None"
    kind = kinds[0]
    if kind == "float":
        if not _is_number(value) or not math.isfinite(value):
            return "must be a finite number"
    elif kind == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            return "must be a whole number"
    elif kind == "bool":
        if not isinstance(value, bool):
            return "must be True or False"
    elif kind == "str":
        if not isinstance(value, str):
            return "must be a string (quote it if it looks like a number: key='123')"
    elif kind == "list[int]":
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return "must be a list of whole numbers, e.g. [16, 28]"
    return None


def _validate(cfg: Config) -> None:
    for name, f in _FIELDS.items():
        value = getattr(cfg, name)
        problem = _type_problem(str(f.type), value)
        if problem is None and value is not None and name in _RANGES:
            test, text = _RANGES[name]
            problem = None if test(value) else f"must be {text}"
        if problem is not None:
            raise ValueError(f"config key {name}={value!r} {problem}")
    checks = [
        ("teacher_set", cfg.teacher_set, TEACHER_SETS),
        ("adaptor", cfg.adaptor, ADAPTORS),
        ("kd", cfg.kd, KD_KINDS),
        ("amp", cfg.amp, AMP_MODES),
        ("loss", cfg.loss, tuple(MARGIN_DEFAULTS)),
        ("adaptor_loss", cfg.adaptor_loss, tuple(MARGIN_DEFAULTS)),
        ("ethnicity", cfg.ethnicity, ETHNICITIES + ("all",)),
    ]
    for key, value, allowed in checks:
        if value not in allowed:
            raise ValueError(f"config key {key}={value!r} is not one of {', '.join(allowed)}")
    if not isinstance(cfg.val_targets, list) or not all(isinstance(name, str) for name in cfg.val_targets):
        raise ValueError(f"config key val_targets={cfg.val_targets!r} must be a list of names, e.g. "
                         "val_targets=['lfw','cfp_fp','agedb_30']")
    if cfg.val_targets and (cfg.val_root is None or cfg.rfw_root is None):
        raise ValueError(f"config key val_targets={cfg.val_targets} needs val_root=<folder with <name>.bin> and "
                         "rfw_root (benchmarks are verified next to RFW, which picks the best epoch)")
    if not re.fullmatch(r"[A-Za-z0-9_.+=-]*", cfg.run_name) or cfg.run_name.startswith("."):
        raise ValueError(f"config key run_name={cfg.run_name!r} may only hold letters, digits and _.+=- "
                         "(it becomes part of folder names)")
    for key in ("milestones", "milestones_fc"):
        value = getattr(cfg, key)
        if list(value) != sorted(value) or any(epoch < 1 for epoch in value):
            raise ValueError(f"config key {key}={value} must be epochs >= 1, sorted ascending")
    if not cfg.fmr_targets or not all(_is_number(t) and 0 < t < 1 for t in cfg.fmr_targets):
        raise ValueError(f"config key fmr_targets={cfg.fmr_targets} must be a non-empty list of FMRs in (0, 1)")


def load_config(overrides: Sequence[str] | dict[str, Any] | None = None) -> Config:
    """Build the config from the defaults and ``key=value`` overrides (or a dict).

    Unknown keys raise a ``KeyError`` naming the closest valid keys.
    """
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = [parse_override(text) for text in overrides or []]
    cfg = Config()
    for key, value in items:
        if key not in _FIELDS:
            close = difflib.get_close_matches(key, list(_FIELDS), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise KeyError(f"unknown config key {key!r}{hint}")
        default = _FIELDS[key].default
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, tuple):
            value = list(value)
        setattr(cfg, key, value)
    _validate(cfg)
    return cfg


def parse_cli(argv: Sequence[str] | None = None, **stage_defaults: Any) -> Config:
    """Config from ``sys.argv``-style ``key=value`` words; ``stage_defaults`` apply before the user's."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help") for arg in argv):
        print("usage: key=value ...  (defaults from config/config.py)")
        comments = _field_comments()
        for name, f in _FIELDS.items():
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            print(f"  {format_override(name, default):<32} {comments.get(name, '')}")
        raise SystemExit(0)
    merged: dict[str, Any] = dict(stage_defaults)
    merged.update(parse_overrides(argv))
    return load_config(merged)


def parse_overrides(words: Sequence[str]) -> dict[str, Any]:
    """The user's ``key=value`` words as a dict. A word without ``=`` or a key given twice is refused
    (``ValueError``): a silent last-wins would hide which value a run used."""
    parsed: dict[str, Any] = {}
    for word in words:
        key, value = parse_override(word)
        if key in parsed:
            raise ValueError(f"config key {key} is given twice ({format_override(key, parsed[key])} and {word}); "
                             "give each key once")
        parsed[key] = value
    return parsed


def merge_overrides(*layers: Sequence[str]) -> list[str]:
    """``key=value`` words of several layers (preset, user, job) as one list with each key once: a later layer
    replaces the value of an earlier one, and a key repeated within one layer is refused (:func:`parse_overrides`)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in parse_overrides(layer).items():
            merged.pop(key, None)  # a replaced key moves to its new layer's place
            merged[key] = value
    return [format_override(key, value) for key, value in merged.items()]


def _field_comments() -> dict[str, str]:
    """The one-line comment of every field, read from this file (so --help and the source never disagree)."""
    source = Path(__file__).read_text()
    return dict(re.findall(r"^    (\w+): [^\n=]+= .*?  # (.*)$", source, flags=re.M))


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` -> ``(key, value)``: the value read as a Python literal, a bare word as a string."""
    if "=" not in text:
        raise ValueError(f"argument {text!r} is not of the form key=value (see config/config.py)")
    key, value = text.split("=", 1)
    return key.strip(), _parse_value(value.strip())

"""The GPU data and step path, exercised on the CPU: uint8 batches flipped and normalised on the device bit for bit
as the CPU reference, a training step that never reads a tensor on the host, exact resume with flips drawn a batch
ahead, and the config keys that switch the path's speed settings."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from config.config import load_config
from utils.core.distributed import DistInfo
from utils.core.signals import TrainingInterrupted
from utils.stages.common import classification_loss, train_options
from utils.train import optim
from utils.train.feed import DeviceFeed
from utils.train.heads import get_head
from utils.train.loop import train
from utils.train.task import TrainingTask
from utils.workdir.artifacts import checkpoint_file

CPU = torch.device("cpu")
ONE_PROCESS = DistInfo(rank=0, local_rank=0, world_size=1, device=CPU)
SIZE = 8


class Faces(Dataset):
    """uint8 RGB images [3, 8, 8] holding every byte value, two identities; ``as_float`` yields them the way the
    datasets did before the device path: normalised by numpy on the CPU."""

    def __init__(self, n: int = 48, as_float: bool = False) -> None:
        generator = np.random.default_rng(0)
        self.images = generator.integers(0, 256, size=(n, 3, SIZE, SIZE), dtype=np.uint8)
        self.images.reshape(-1)[:256] = np.arange(256, dtype=np.uint8)
        self.labels = np.arange(n) % 2
        self.as_float = as_float

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image = self.images[i]
        if self.as_float:
            return torch.from_numpy(cpu_reference(image)), int(self.labels[i]), i
        return torch.from_numpy(image.copy()), int(self.labels[i]), i


def cpu_reference(images: np.ndarray) -> np.ndarray:
    """The CPU normalisation the datasets applied before the device path, in numpy float32."""
    return (images.astype(np.float32) / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5)


def feed_batches(dataset: Dataset, channels_last: bool = False, seed: int = 7) -> list:
    loader = DataLoader(dataset, batch_size=16, shuffle=False)
    generator = torch.Generator().manual_seed(seed)
    return list(DeviceFeed(loader, CPU, generator, flip=True, channels_last=channels_last))


@pytest.mark.parametrize("channels_last", [False, True])
def test_device_flip_and_normalisation_equal_the_cpu_path_bit_for_bit(channels_last):
    dataset = Faces()
    batches = feed_batches(dataset, channels_last)
    # Today's flip: one draw of the epoch's generator per batch, in loader order, mirrored where < 0.5.
    generator = torch.Generator().manual_seed(7)
    for number, batch in enumerate(batches):
        flags = torch.rand(16, generator=generator) < 0.5
        expected = cpu_reference(dataset.images[16 * number:16 * (number + 1)])
        expected[flags.numpy()] = expected[flags.numpy()][..., ::-1]
        assert batch.inputs.dtype == torch.float32 and torch.equal(batch.flipped, flags)
        assert np.array_equal(batch.inputs.numpy(), expected)
        assert batch.inputs.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert 0 < int(torch.cat([b.flipped for b in batches]).sum()) < 48
    values = batches[0].inputs.unique()
    assert len(values) == 256 and values.min() == -1.0 and values.max() == 1.0


def test_uint8_and_float_batches_are_identical_after_normalisation():
    from_uint8, from_float = feed_batches(Faces()), feed_batches(Faces(as_float=True))
    for a, b in zip(from_uint8, from_float, strict=True):
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.flipped, b.flipped)
        assert torch.equal(a.labels, b.labels) and torch.equal(a.rows, b.rows)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.PReLU(4), nn.Flatten(),
                                  nn.Linear(4 * SIZE * SIZE, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def face_task(run_dir: Path, loss_fn=classification_loss, epochs: int = 2) -> TrainingTask:
    torch.manual_seed(0)
    return TrainingTask(stage="teacher", run_dir=run_dir, config={}, provenance=lambda: {"stage": "teacher"}, model=Net(),
                        model_name="backbone", dataset=Faces(), loss_fn=loss_fn, lr=0.05, num_epochs=epochs,
                        milestones=[], batch_size=8, header=get_head("ElasticArcFace", 8, 2, s=8.0, m=0.3, std=0.05))


def options(tmp_path: Path, **extra):
    return train_options(load_config({"output_root": str(tmp_path), "num_workers": 0, **extra}))


HOST_READS = ("item", "__bool__", "__float__", "__int__", "cpu", "tolist", "numpy")


@pytest.mark.parametrize("amp,fused", [("none", False), ("bf16", False), ("fp16", True)])
def test_a_steady_state_step_reads_no_tensor_on_the_host(tmp_path, monkeypatch, amp, fused):
    """Between the forward of step k and that of step k+1 (not a logging step, not the epoch's last), no tensor is
    read on the host. fp16 runs the fused SGD that CUDA gets, which takes the scaler's overflow flag on the device."""
    events: list[str] = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            events.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    monkeypatch.setattr(optim, "fused_on", lambda device: fused)

    def marked_loss(model, header, batch):
        events.append("forward")
        return classification_loss(model, header, batch)

    result = train(face_task(tmp_path / "run", marked_loss, epochs=1),
                   options(tmp_path, amp=amp, amp_init_scale=256.0, log_every=1000), ONE_PROCESS)
    assert result.complete
    forwards = [i for i, event in enumerate(events) if event == "forward"]
    assert len(forwards) == 6
    between = events[forwards[0]:forwards[-1]]
    assert [event for event in between if event != "forward"] == [], f"host reads in steady steps ({amp})"
    assert events[forwards[-1]:] != ["forward"], "the epoch's end reads its totals: the counting works"


def test_fused_sgd_with_a_skipped_first_step_starts_momentum_at_zero(monkeypatch):
    """A first step the scaler skips must leave the momentum at zero (the fused kernel would leave it uninitialised),
    so the first real update is plain SGD's first update."""
    monkeypatch.setattr(optim, "fused_on", lambda device: True)
    param, reference = nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(4))
    fused = optim.build_sgd([{"params": [param]}], lr=0.1, momentum=0.9, weight_decay=5e-4, device=CPU)
    plain = torch.optim.SGD([reference], lr=0.1, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    for grad in (float("inf"), 2.0):
        scaler.scale(torch.zeros(()))  # the loss would be scaled here
        param.grad = torch.full((4,), grad)
        scaler.unscale_(fused)
        scaler.step(fused)  # fused: the overflow flag stays on the device, the kernel skips the update
        scaler.update()
    assert scaler.get_scale() == 2.0, "the first step was skipped"
    reference.grad = torch.full((4,), 2.0 / 2.0)  # the second step's gradient, unscaled
    plain.step()
    assert fused.defaults["fused"] and torch.equal(param.detach(), reference.detach())
    assert torch.equal(fused.state[param]["momentum_buffer"], plain.state[reference]["momentum_buffer"])


def test_killed_run_resumes_to_bit_identical_weights_with_flips_drawn_ahead(tmp_path):
    """The feed draws batch k+1's flips before step k; a stop after step 6 must checkpoint the generator as of step
    6, or the resumed run would mirror other images."""
    def noisy_loss(model, header, batch):
        losses = classification_loss(model, header, batch)
        return {"loss": losses["loss"] * (1 + 0.1 * torch.rand(()))}

    def terminated_at_step_9(model, header, batch):
        terminated_at_step_9.calls += 1
        if terminated_at_step_9.calls == 9:
            os.kill(os.getpid(), signal.SIGTERM)
        return noisy_loss(model, header, batch)

    terminated_at_step_9.calls = 0
    run_dir = tmp_path / "run"
    settings = {"resume": True, "log_every": 4}
    with pytest.raises(TrainingInterrupted, match=r"stopped after step 9 \(3 of 6 in epoch 2\)"):
        train(face_task(run_dir, terminated_at_step_9, epochs=3), options(tmp_path, **settings), ONE_PROCESS)
    assert torch.load(checkpoint_file(run_dir), weights_only=True)["mid_epoch"]["step"] == 3
    resumed = train(face_task(run_dir, noisy_loss, epochs=3), options(tmp_path, **settings), ONE_PROCESS)
    straight = train(face_task(tmp_path / "straight", noisy_loss, epochs=3), options(tmp_path, **settings),
                     ONE_PROCESS)
    assert resumed.complete and straight.complete
    a, b = (torch.load(r.best_weights, weights_only=True) for r in (resumed, straight))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("key,value", [("channels_last", "yes"), ("cudnn_benchmark", 1), ("compile", "auto")])
def test_speed_keys_are_validated_by_name(key, value):
    with pytest.raises(ValueError, match=rf"config key {key}=.* must be True or False"):
        load_config({key: value})


def test_speed_keys_reach_the_loop_with_their_defaults():
    cfg = load_config({})
    assert (cfg.channels_last, cfg.cudnn_benchmark, cfg.compile) == (True, True, False)
    loop = train_options(load_config({"channels_last": False, "cudnn_benchmark": False, "compile": True}))
    assert (loop.channels_last, loop.cudnn_benchmark, loop.compile) == (False, False, True)


def test_a_compiled_run_trains_saves_the_plain_model_and_resumes(tmp_path, monkeypatch):
    """compile=True compiles the module the loop trains; weights and checkpoints hold the plain model's keys (they
    load into an uncompiled network), a stopped compiled run resumes, and it ends where the eager run ends.
    aot_eager stands in for inductor, whose CPU code generation takes most of a minute: under test is the loop's
    handling of a compiled module, which is the same whatever the backend generates."""
    compiled: list[nn.Module] = []
    real_compile = torch.compile

    def aot_eager(module: nn.Module, **kwargs):
        compiled.append(module)
        return real_compile(module, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", aot_eager)
    run_dir = tmp_path / "compiled"
    first = train(face_task(run_dir, epochs=2), options(tmp_path, compile=True, resume=True, stop_after_epoch=1),
                  ONE_PROCESS)
    assert not first.complete and len(compiled) == 1
    resumed = train(face_task(run_dir, epochs=2), options(tmp_path, compile=True, resume=True), ONE_PROCESS)
    eager = train(face_task(tmp_path / "eager", epochs=2), options(tmp_path), ONE_PROCESS)
    assert resumed.complete and len(compiled) == 2
    weights, reference = (torch.load(r.best_weights, weights_only=True) for r in (resumed, eager))
    assert weights.keys() == Net().state_dict().keys() == reference.keys()
    Net().load_state_dict(weights)
    assert all(torch.allclose(weights[k].float(), reference[k].float(), atol=1e-5) for k in weights)

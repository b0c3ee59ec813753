"""The CUDA path on a GPU (marked gpu: skipped on CPU-only machines such as CI, run by benchmarks/gpu_check.sh).

GPUAugment's generator lives on its input's device, so CUDA and CPU draw different random streams for one
seed; the warps are compared for the same drawn parameters instead.
"""

from __future__ import annotations

import copy

import pytest
import torch

from openmind_tools.augment import AugmentSettings, GPUAugment, affine_warp
from training.config import StageConfig
from training.train import _autocast, build_trainable, train_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _batch(device: str, size: int = 48) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.avg_pool3d(torch.randn(2, 1, size, size, size, generator=g), 5, 1, 2)
    anatomy = (image > -0.1).to(torch.uint8)
    deface = torch.zeros_like(anatomy)
    deface[..., :4] = 1
    return {"image": image.half().to(device), "anatomy": anatomy.to(device), "deface": deface.to(device)}


def test_cuda_augmentation_warps_as_the_cpu_does_for_the_same_parameters() -> None:
    batch = _batch("cuda")
    settings = AugmentSettings(out_size=32, p_rotation=1.0, p_scale=1.0, seed=3)
    out = GPUAugment(settings)(batch["image"].float(), masks=(batch["anatomy"],))
    assert out.image.is_cuda and torch.isfinite(out.image).all()
    on_cpu = affine_warp(batch["image"].float().cpu(), out.affine.cpu(), (32, 32, 32))
    torch.testing.assert_close(out.target.cpu(), on_cpu, rtol=1e-3, atol=1e-3)


def _trainable(objective: str):
    options = {"mae": {"block_size": 8}, "voco": {"hidden_dim": 64, "out_dim": 64}}[objective]
    stage = StageConfig(name=objective, objective=objective, manifest="unused", patch_size=48, out_size=32,
                        options=options)  # fmt: skip
    torch.manual_seed(0)
    return build_trainable("resenc_tiny", stage, torch.device("cuda"), world=1, schedule_steps=100), stage


@pytest.mark.parametrize("objective", ["mae", "voco"])
def test_a_bf16_training_step_on_cuda_is_finite_and_moves_the_weights(objective: str) -> None:
    t, stage = _trainable(objective)
    before = copy.deepcopy(t.net.state_dict())
    augment, generator = GPUAugment(AugmentSettings(out_size=32)), torch.Generator().manual_seed(0)
    loss, _ = train_step(t, augment, _batch("cuda"), generator, _autocast(torch.device("cuda")), stage.grad_clip)
    assert torch.isfinite(loss).item()
    assert any(not torch.equal(v, t.net.state_dict()[k]) for k, v in before.items() if v.is_floating_point())


def test_resume_on_cuda_reproduces_the_next_step() -> None:
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    autocast, batch = _autocast(torch.device("cuda")), _batch("cuda")
    t, stage = _trainable("mae")
    augment, generator = GPUAugment(AugmentSettings(out_size=32, seed=1)), torch.Generator().manual_seed(0)
    train_step(t, augment, batch, generator, autocast, stage.grad_clip)
    saved = {"objective": copy.deepcopy(t.objective.state_dict()),
             "optimizer": copy.deepcopy(t.optimizer.state_dict()), "scheduler": t.scheduler.state_dict(),
             "augment": augment.state_dict(), "generator": generator.get_state()}  # fmt: skip
    expected, _ = train_step(t, augment, batch, generator, autocast, stage.grad_clip)

    resumed, _ = _trainable("mae")
    resumed.objective.load_state_dict(saved["objective"])
    resumed.optimizer.load_state_dict(saved["optimizer"])
    resumed.scheduler.load_state_dict(saved["scheduler"])
    again = GPUAugment(AugmentSettings(out_size=32, seed=1))
    again.load_state_dict(saved["augment"])
    loss, _ = train_step(resumed, again, batch, torch.Generator().set_state(saved["generator"]), autocast,
                         stage.grad_clip)  # fmt: skip
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)  # cuDNN deterministic; bf16 sums may reorder

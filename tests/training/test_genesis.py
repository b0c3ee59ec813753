"""Models Genesis: each corruption's defining property, checked on the batch, and the loss over the whole U-Net."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from openmind_tools.errors import ConfigError
from training.genesis import GenesisLoss, GenesisOptions, bezier_map, box_mask, corrupt, draw, local_shuffle
from training.model import resenc_tiny

SHAPE = (24, 32, 16)


def _ramp(batch: int = 3) -> torch.Tensor:
    """(batch, 1, *SHAPE) with every voxel's value distinct, offset per sample, z-score-like range."""
    values = torch.arange(batch * 24 * 32 * 16, dtype=torch.float32).view(batch, 1, *SHAPE)
    return (values - values.mean()) / values.std()


def _only(draws, **fire):
    """The draws with every coin off but those named (True for all samples, or a (B,) mask)."""
    off = {name: torch.zeros_like(draws.shuffle) for name in ("shuffle", "nonlinear", "decreasing", "paint")}
    return draws._replace(**{**off, **{k: torch.as_tensor(v).expand_as(draws.shuffle) for k, v in fire.items()}})


def test_local_shuffling_permutes_within_each_window_only_where_it_fires() -> None:
    x = _ramp()
    fire = torch.tensor([True, False, True])
    shuffled = local_shuffle(x, 4, fire, torch.Generator().manual_seed(0))
    before, after = (
        t.reshape(3, 6, 4, 8, 4, 4, 4).permute(0, 1, 3, 5, 2, 4, 6).reshape(3, -1, 64) for t in (x, shuffled)
    )
    assert torch.equal(before.sort(dim=-1).values, after.sort(dim=-1).values)  # each window keeps its values
    assert torch.equal(shuffled[1], x[1])  # not fired: untouched
    moved = (shuffled != x)[fire].float().mean()
    assert moved > 0.9  # nearly every voxel leaves its place (1/64 stays by chance)


def test_the_nonlinear_map_is_monotone_and_keeps_the_ends() -> None:
    x = torch.linspace(0, 1, 1001).expand(4, -1)
    control = torch.rand(4, 2, 2, generator=torch.Generator().manual_seed(1))
    y = bezier_map(x, control)
    assert (y.diff(dim=1) >= -1e-6).all() and y.min() >= 0 and y.max() <= 1
    torch.testing.assert_close(y[:, [0, -1]], torch.tensor([[0.0, 1.0]] * 4), atol=1e-5, rtol=0)
    assert (y - x).abs().amax(dim=1).min() > 0.01  # a curve, not the identity
    assert (bezier_map(1 - x, control).diff(dim=1) <= 1e-6).all()  # the decreasing half of the draws


def test_cut_out_boxes_have_the_authors_sizes_and_stay_inside() -> None:
    edges = torch.tensor(SHAPE)
    for inner, (low, high) in ((1.0, (1 / 6, 1 / 3)), (0.0, (3 / 7, 4 / 7))):
        d = draw(500, SHAPE, torch.Generator().manual_seed(2), p_inner=inner)
        active = d.box_active
        sizes = d.box_sizes[active]
        assert ((sizes >= (low * edges).long()) & (sizes <= (high * edges).long())).all()
        assert ((d.box_starts[active] >= 0) & (d.box_starts + d.box_sizes <= edges)[active]).all()
        assert (active.cummin(dim=1).values == active).all()  # boxes are drawn in order, stopping at the first miss
        counts = active.sum(dim=1).float()
        assert 3.5 < counts.mean() < 5 and counts.max() == 5
        assert counts.min() == (0 if inner else 1)  # outer cut-out always keeps a box


def test_inner_cut_out_fills_its_boxes_with_noise_and_outer_everything_else() -> None:
    x = _ramp()
    base = draw(3, SHAPE, torch.Generator().manual_seed(3), p_inner=1.0)
    for inner in (True, False):
        d = _only(base, paint=True)._replace(inner=torch.full((3,), inner))
        d = d._replace(box_active=d.box_active | torch.tensor([True, False, False, False, False]))  # >= 1 box
        out = corrupt(x, d, 4)
        inside = box_mask(SHAPE, d.box_starts, d.box_sizes, d.box_active)
        noisy = inside if inner else ~inside
        torch.testing.assert_close(out[~noisy], x[~noisy], rtol=0, atol=1e-5)  # the rest is the image
        assert (out[noisy] != x[noisy]).float().mean() > 0.99
        low, high = x.flatten(1).aminmax(dim=1)
        for b in range(3):  # the noise is uniform over the sample's own range
            values = out[b][noisy[b]]
            assert low[b] - 1e-5 <= values.min() and values.max() <= high[b] + 1e-5


def test_with_every_coin_off_the_input_comes_back() -> None:
    x = _ramp()
    d = _only(draw(3, SHAPE, torch.Generator().manual_seed(4)))
    torch.testing.assert_close(corrupt(x, d, 4), x, rtol=0, atol=1e-5)


def test_the_draws_follow_the_generator_and_differ_per_sample() -> None:
    x = _ramp()
    first, again = (corrupt(x, draw(3, SHAPE, torch.Generator().manual_seed(5)), 4) for _ in range(2))
    assert torch.equal(first, again)
    d = draw(64, SHAPE, torch.Generator().manual_seed(6))
    for coin, rate in (("shuffle", 0.5), ("nonlinear", 0.9), ("paint", 0.9)):
        assert abs(getattr(d, coin).float().mean() - rate) < 0.2, coin


def test_the_loss_is_the_mse_of_the_whole_unet_outside_the_deface_mask() -> None:
    torch.manual_seed(0)
    image = torch.randn(2, 1, 32, 32, 32)
    deface = torch.zeros_like(image, dtype=torch.uint8)
    deface[:, :, :8] = 1
    batch = {"image": image, "target": image + 0.5, "deface": deface}
    objective = GenesisLoss(resenc_tiny())
    with torch.no_grad():
        loss, logs = objective(batch, torch.Generator().manual_seed(7))
        corrupted = corrupt(image, draw(2, (32, 32, 32), torch.Generator().manual_seed(7)), 4)
        kept = ~deface.bool()
        torch.testing.assert_close(loss, (objective.net(corrupted) - batch["target"])[kept].square().mean())
        torch.testing.assert_close(logs["genesis_copy_mse"], (corrupted - batch["target"])[kept].square().mean())
        moved = dict(batch, target=torch.where(deface.bool(), batch["target"] + 100, batch["target"]))
        torch.testing.assert_close(objective(moved, torch.Generator().manual_seed(7))[0], loss)


def test_the_window_must_tile_the_patch() -> None:
    with pytest.raises(ConfigError, match="not a multiple of options.shuffle_window 5"):
        GenesisOptions(shuffle_window=5).check_size(48)
    with pytest.raises(ConfigError, match="options.p_inner"):
        dataclasses.replace(GenesisOptions(), p_inner=1.5)

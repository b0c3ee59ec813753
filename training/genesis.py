"""Models Genesis (Zhou et al., MICCAI 2019 / MedIA 2021): the whole U-Net restores a corrupted patch, MSE loss.

Per sample, in the order and at the rates of the authors' `generate_pair` (pytorch/utils.py and its config):
local pixel shuffling (p 0.5), a non-linear intensity map (p 0.9: a cubic Bezier curve from (0, 0) to (1, 1)
through two random control points, decreasing for half of the samples), then cut-out (p 0.9), inner for 0.2 of
those (up to 5 boxes of 1/6..1/3 of each edge filled with uniform noise) and outer for the rest (all but up to 5
boxes of 3/7..4/7 of each edge is noise). Their flip is the loop's augmentation's job. The transforms work on the
sample's intensities mapped to [0, 1] by its min and max (their images are in [0, 1]) and map back after.
Their pixel shuffling permutes 10000 windows of random size (1 to a tenth of an edge) at random places, which
covers nearly every voxel; here every window of a grid of `shuffle_window`^3 voxels is permuted, so the whole
batch is one argsort on the device. Arrays are (B, 1, D, H, W).

The input is the loop's augmented view ("image"), the target its intensity-clean view ("target"), as MAE's
(AMAES): the network undoes the corruption and the intensity augmentation; turn the stage's intensity ops off for
the authors' setting. The loss is the MSE over every voxel outside the deface mask (defaced voxels are zeros that
no network should learn to paint). Per-sample parameters come from the loop's (CPU) generator; the bulk draws (the
shuffles' permutations, the noise) from a generator on the batch's device seeded by it, so nothing large crosses
the bus and a resumed run draws the same.

Trainer interface (training.objectives):
    objective = GenesisLoss(net, ...)            # owns the whole net
    loss, logs = objective(batch, generator)     # batch on device: "image", "target" (B, 1, D, H, W), "deface"
    loss.backward(); optimizer.step(); objective.after_step()   # after_step does nothing
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from torch import Tensor, nn

from openmind_tools.errors import ConfigError
from training.config import check_ranges
from training.model import reconstruction_unet

_BOXES = 5  # at most this many cut-out boxes per sample (the authors' `cnt`)
_P_ANOTHER_BOX = 0.95  # each further box is drawn with this probability
_INNER_SIZE = (1 / 6, 1 / 3)  # edge of an inner box, as a share of the patch edge
_OUTER_SIZE = (3 / 7, 4 / 7)  # edge of a box that outer cut-out keeps
_MARGIN = 3  # voxels between a box and the patch border, where the patch allows
_CURVE_POINTS = 1024  # samples of each Bezier curve, interpolated linearly


@dataclass(frozen=True)
class GenesisOptions:
    """A Genesis stage's `options` table (GenesisLoss's keyword arguments), checked when the recipe loads.

    Probabilities are the authors' config: local_rate 0.5, nonlinear_rate 0.9, paint_rate 0.9, inpaint_rate 0.2.
    """

    p_shuffle: float = 0.5
    shuffle_window: int = 4  # window edge in voxels (the authors' windows average ~3.5 voxels an edge)
    p_nonlinear: float = 0.9
    p_paint: float = 0.9  # cut-out, inner or outer
    p_inner: float = 0.2  # of the cut-outs, the share that is inner

    metadata: ClassVar[tuple[tuple[str, str], ...]] = ()  # (manifest column, "number" | "any")

    def __post_init__(self) -> None:
        check_ranges("options", self, p_shuffle=(0, 1), shuffle_window=(1, None), p_nonlinear=(0, 1), p_paint=(0, 1),
                     p_inner=(0, 1))  # fmt: skip

    def check_size(self, out_size: int) -> None:
        if out_size % self.shuffle_window:
            raise ConfigError(f"out_size {out_size} is not a multiple of options.shuffle_window {self.shuffle_window}")


class Draws(NamedTuple):
    """One batch's corruption: per-sample choices from the loop's generator, and the seed of the bulk draws."""

    shuffle: Tensor  # (B,) bool
    nonlinear: Tensor  # (B,) bool
    decreasing: Tensor  # (B,) bool: the curve is applied to 1 - x
    control: Tensor  # (B, 2, 2) float: the curve's two inner control points, (x, y) each in [0, 1]
    paint: Tensor  # (B,) bool
    inner: Tensor  # (B,) bool: inner cut-out (noise in the boxes), else outer (noise outside them)
    box_starts: Tensor  # (B, _BOXES, 3) int64
    box_sizes: Tensor  # (B, _BOXES, 3) int64
    box_active: Tensor  # (B, _BOXES) bool
    seed: int  # of the device generator for the shuffles' permutations and the noise


def draw(
    batch: int,
    shape: Sequence[int],
    generator: torch.Generator,
    p_shuffle: float = 0.5,
    p_nonlinear: float = 0.9,
    p_paint: float = 0.9,
    p_inner: float = 0.2,
) -> Draws:
    """Per-sample parameters of the corruption of a (batch, 1, *shape) patch, drawn from `generator`."""
    coins = torch.rand(batch, 5, generator=generator)
    control = torch.rand(batch, 2, 2, generator=generator)
    inner = coins[:, 4] < p_inner
    edges = torch.tensor([int(s) for s in shape])
    low, high = (torch.where(inner[:, None, None], a, b) for a, b in zip(_INNER_SIZE, _OUTER_SIZE, strict=True))
    low, high = (low * edges).long().clamp_min(1), (high * edges).long().clamp_min(1)  # (B, 1, 3) each
    sizes = low + (torch.rand(batch, _BOXES, 3, generator=generator) * (high - low + 1)).long()
    sizes = torch.minimum(sizes, edges)
    first = torch.minimum(torch.full_like(sizes, _MARGIN), edges - sizes)
    last = torch.maximum(edges - sizes - _MARGIN, first)
    starts = first + (torch.rand(batch, _BOXES, 3, generator=generator) * (last - first + 1)).long()
    another = torch.rand(batch, _BOXES, generator=generator) < _P_ANOTHER_BOX
    another[:, 0] |= ~inner  # outer cut-out keeps at least one box, inner may draw none
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return Draws(coins[:, 0] < p_shuffle, coins[:, 1] < p_nonlinear, coins[:, 2] < 0.5, control, coins[:, 3] < p_paint,
                 inner, starts, sizes, another.cumprod(dim=1).bool(), seed)  # fmt: skip


def corrupt(image: Tensor, draws: Draws, shuffle_window: int = 4) -> Tensor:
    """The corrupted float32 (B, 1, D, H, W) input: shuffle, then non-linear map, then cut-out, in [0, 1] units."""
    x = image.float()
    d = Draws(*(v.to(x.device, non_blocking=True) if isinstance(v, Tensor) else v for v in draws))
    low, high = x.flatten(1).aminmax(dim=1)
    low, span = _per_sample(low), _per_sample((high - low).clamp_min(1e-6))
    x = (x - low) / span
    bulk = torch.Generator(device=x.device).manual_seed(d.seed)
    x = local_shuffle(x, shuffle_window, d.shuffle, bulk)
    mapped = bezier_map(torch.where(_per_sample(d.decreasing), 1 - x, x), d.control)
    x = torch.where(_per_sample(d.nonlinear), mapped, x)
    noise = torch.rand(x.shape, generator=bulk, device=x.device, dtype=x.dtype)
    inside = box_mask(x.shape[2:], d.box_starts, d.box_sizes, d.box_active)
    noisy = torch.where(_per_sample(d.inner), inside, ~inside) & _per_sample(d.paint)
    return torch.where(noisy, noise, x) * span + low


def local_shuffle(x: Tensor, window: int, fire: Tensor, generator: torch.Generator) -> Tensor:
    """Permute the voxels within every `window`^3 block of the grid tiling x (B, C, D, H, W), where fire (B,)."""
    b, c, *size = x.shape
    if any(s % window for s in size):
        raise ConfigError(f"patch: expected edges divisible by shuffle_window {window}, got {tuple(size)}")
    g = [s // window for s in size]
    blocks = x.reshape(b, c, g[0], window, g[1], window, g[2], window).permute(0, 1, 2, 4, 6, 3, 5, 7)
    blocks = blocks.reshape(b, c, g[0] * g[1] * g[2], window**3)
    order = torch.rand(blocks.shape, generator=generator, device=x.device).argsort(dim=-1)
    shuffled = torch.where(fire.view(-1, 1, 1, 1), blocks.gather(-1, order), blocks)
    return shuffled.reshape(b, c, *g, window, window, window).permute(0, 1, 2, 5, 3, 6, 4, 7).reshape(x.shape)


def bezier_map(x: Tensor, control: Tensor) -> Tensor:
    """x (B, ...) in [0, 1] through each sample's cubic Bezier curve (0, 0), control (B, 2, 2), (1, 1).

    With control points in the unit square both coordinates of the curve are non-decreasing in its parameter, so
    the curve is the graph of a non-decreasing map of [0, 1] onto itself.
    """
    t = torch.linspace(0, 1, _CURVE_POINTS, device=x.device)[None]
    weights = (3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3)  # of P1, P2, P3 (P0 is the origin)
    points = [weights[0] * control[:, 0, axis, None] + weights[1] * control[:, 1, axis, None] + weights[2]
              for axis in (0, 1)]  # fmt: skip
    curve_x, curve_y = points[0].cummax(dim=1).values.contiguous(), points[1]  # cummax: float rounding only
    flat = x.reshape(len(x), -1).contiguous()
    right = torch.searchsorted(curve_x, flat).clamp(1, _CURVE_POINTS - 1)
    x0, x1 = curve_x.gather(1, right - 1), curve_x.gather(1, right)
    y0, y1 = curve_y.gather(1, right - 1), curve_y.gather(1, right)
    share = ((flat - x0) / (x1 - x0).clamp_min(1e-12)).clamp(0, 1)
    return (y0 + share * (y1 - y0)).reshape(x.shape)


def box_mask(shape: Sequence[int], starts: Tensor, sizes: Tensor, active: Tensor) -> Tensor:
    """(B, 1, *shape) bool on the boxes' device: inside any active box of each sample.

    starts, sizes (B, N, 3) int64 and active (B, N) bool; each box is the product of three index ranges.
    """
    inside = torch.zeros(len(starts), 1, *shape, dtype=torch.bool, device=starts.device)
    for box in range(starts.shape[1]):
        along = []
        for axis, edge in enumerate(shape):
            index = torch.arange(edge, device=starts.device)
            start, stop = starts[:, box, axis, None], starts[:, box, axis, None] + sizes[:, box, axis, None]
            along.append((index >= start) & (index < stop) & active[:, box, None])  # (B, edge)
        inside |= (along[0][:, :, None, None] & along[1][:, None, :, None] & along[2][:, None, None, :])[:, None]
    return inside


class GenesisLoss(nn.Module):
    """Restoration MSE of the Genesis-corrupted view; see the module docstring for the call shape."""

    views = 1  # augmented views of each patch it takes (training.objectives.Objective)
    trains_decoder = True  # the whole U-Net

    def __init__(
        self,
        net: ResidualEncoderUNet,
        p_shuffle: float = 0.5,
        shuffle_window: int = 4,
        p_nonlinear: float = 0.9,
        p_paint: float = 0.9,
        p_inner: float = 0.2,
    ) -> None:
        super().__init__()
        self.net = reconstruction_unet(net)
        self.shuffle_window = shuffle_window
        self.rates = {"p_shuffle": p_shuffle, "p_nonlinear": p_nonlinear, "p_paint": p_paint, "p_inner": p_inner}

    def forward(self, batch: dict[str, Tensor], generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        image, target = batch["image"], batch["target"].float()
        corrupted = corrupt(image, draw(len(image), image.shape[2:], generator, **self.rates), self.shuffle_window)
        weights = ~batch["deface"].bool()
        count = weights.sum().clamp_min(1)
        loss = ((self.net(corrupted).float() - target).square() * weights).sum() / count
        copy = ((corrupted - target).square() * weights).sum() / count  # the loss of handing the input back
        return loss, {"genesis_mse": loss.detach(), "genesis_copy_mse": copy}

    def after_step(self) -> None:
        """Nothing to update after an optimizer step; present so one loop runs every objective."""


def _per_sample(values: Tensor) -> Tensor:
    return values.view(-1, 1, 1, 1, 1)

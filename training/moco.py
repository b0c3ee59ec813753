"""MoCo v2 (He et al. CVPR 2020; Chen et al. 2020) for 3D patches: a momentum key encoder and a queue of negatives.

The loop augments the loader's crop twice (`views`); the query view goes through the encoder and an MLP head, the
key view through the key encoder, an EMA copy of both (momentum 0.999, MoCo's). With unit rows q, k (B, E) and the
queue Q (K, E) of earlier keys, the loss is InfoNCE with the key as the one positive: the mean over rows of
-log(exp(q.k / t) / (exp(q.k / t) + sum_j exp(q.Q_j / t))), t = 0.2 (MoCo v2). After each optimizer step the
batch's keys replace the oldest in the queue, then the key encoder moves toward the encoder.

The queue is a buffer of this module's state_dict (with its write position), so a checkpoint resumes it exactly;
it starts as unit vectors drawn from a fixed seed, the same on every rank. Under DDP each rank enqueues the keys of
every rank (all-gathered, ranks in order), so all ranks hold the same queue; a rank's own queries are its anchors.
(DDP's default broadcast_buffers also copies rank 0's queue to the others before each forward: 2 MB a step at the
defaults, and the ranks cannot drift apart even by rounding.)

Shuffled BN, and what stands in for it: MoCo shuffles the key batch across GPUs because BatchNorm's batch
statistics let a query find its key through what their batch shares instead of through the image (He et al.
section 3.3). ResEnc normalises with InstanceNorm3d (per sample), so the one op here that sees other rows is the
projection head's BatchNorm1d, which this project's heads keep because without it the pooled InstanceNorm
bottleneck is nearly the same vector for every patch (`PooledProjection`; on demo_moco.toml, 75 steps, a head
without BN, MoCo v2's own, kept the mean cosine between different patches at 0.68-0.94 and its loss did not fall,
1.90 -> 1.99 first to last quarter; with BN 0.39-0.51, and 2.15 -> 1.63). So the
query head normalises over this rank's queries, and the key head over the keys of every rank (`GatheredBatchNorm`:
SimCLR's global BN), whose statistics a rank's own rows are 1/world of, as a shuffle would make them. On a single
process the two batches hold the same patches and nothing breaks the leak; MoCo's shuffle would not either (on one
GPU it is the identity). The log's monitors (training.contrastive.collapse_monitors on [q; k], and moco_queue_cos,
the mean cosine of a query with the queue) show a cheat or a collapse: a top-1 of 1 with the loss near zero.

Trainer interface (training.objectives):
    objective = MoCoLoss(net, ...)               # owns net.encoder, the head, the key encoder and the queue
    loss, logs = objective(batch, generator)     # batch: "views" (2 tensors (B, 1, D, H, W)); generator unused
    loss.backward(); optimizer.step(); objective.after_step()   # enqueue this step's keys, then the EMA update
"""

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from torch import nn

from training.config import check_ranges
from training.contrastive import collapse_monitors, gather_rows
from training.model import PooledProjection, ema_update

_QUEUE_SEED = 0  # the queue's first contents: one draw, the same on every rank and in every run


@dataclass(frozen=True)
class MoCoOptions:
    """A MoCo stage's `options` table (MoCoLoss's keyword arguments), checked when the recipe loads.

    Defaults are MoCo v2's: temperature 0.2, key-encoder momentum 0.999, a 2048 -> 128 MLP head. MoCo keeps 65536
    keys of ImageNet's 1.28 M images (5 %); 4096 is as large a share of OpenMind's 114k volumes.
    """

    temperature: float = 0.2
    momentum: float = 0.999
    queue_size: int = 4096  # keys kept as negatives
    hidden_dim: int = 2048
    out_dim: int = 128

    metadata: ClassVar[tuple[tuple[str, str], ...]] = ()  # (manifest column, "number" | "any")

    def __post_init__(self) -> None:
        check_ranges("options", self, temperature=(0, None, "open"), momentum=(0, 1, "right-open"),
                     queue_size=(1, None), hidden_dim=(1, None), out_dim=(1, None))  # fmt: skip

    def check_size(self, out_size: int) -> None:
        """Any patch size pools to one embedding."""


class MoCoLoss(nn.Module):
    """InfoNCE of each query against its key and the queue; see the module docstring for the call shape."""

    views = 2  # augmented views of each patch it takes (training.objectives.Objective)
    trains_decoder = False  # the encoder (and its head) alone: its export omits the decoder

    def __init__(
        self,
        net: ResidualEncoderUNet,
        temperature: float = 0.2,
        momentum: float = 0.999,
        queue_size: int = 4096,
        hidden_dim: int = 2048,
        out_dim: int = 128,
    ) -> None:
        super().__init__()
        self.temperature, self.momentum = temperature, momentum
        self.query = PooledProjection(net.encoder, (hidden_dim, out_dim))
        self.key = copy.deepcopy(self.query).requires_grad_(False)
        for i, layer in enumerate(self.key.head):  # the key head's BN sees every rank's keys
            if isinstance(layer, nn.BatchNorm1d):
                self.key.head[i] = GatheredBatchNorm(layer.eps)
        first = torch.randn(queue_size, out_dim, generator=torch.Generator().manual_seed(_QUEUE_SEED))
        self.register_buffer("queue", F.normalize(first, dim=1))
        self.register_buffer("queue_position", torch.zeros((), dtype=torch.int64))  # the next row to overwrite
        self._keys: torch.Tensor | None = None  # every rank's keys of the last forward, enqueued by after_step

    def forward(
        self, batch: dict[str, Any], generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        first, second = batch["views"]
        q = F.normalize(self.query(first).float(), dim=1)
        with torch.no_grad():
            k = F.normalize(self.key(second).float(), dim=1)
        loss = queue_loss(q, k, self.queue, self.temperature)
        self._keys = gather_rows(k)[0]
        logs = collapse_monitors(torch.cat([q.detach(), k]), len(q))
        logs["moco_queue_cos"] = (q.detach() @ self.queue.T).mean()
        return loss, logs

    def after_step(self) -> None:
        """Enqueue the last forward's keys (every rank's), then move the key encoder toward the encoder."""
        if self._keys is not None:
            self.enqueue(self._keys)
            self._keys = None
        ema_update(self.key, self.query, self.momentum)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write `keys` (N, E) over the oldest rows of the queue, wrapping around; of more than K, the last K stay."""
        size = len(self.queue)
        keys = keys[-size:]
        rows = (self.queue_position + torch.arange(len(keys), device=self.queue.device)) % size
        self.queue[rows] = keys.to(self.queue.dtype)
        self.queue_position.copy_((self.queue_position + len(keys)) % size)


def queue_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE: unit rows q, k (B, E) and queue (K, E); the positive of row i is k_i, the negatives the queue."""
    logits = torch.cat([(q * k).sum(dim=1, keepdim=True), q @ queue.T], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.int64, device=q.device))


class GatheredBatchNorm(nn.Module):
    """BatchNorm1d without affine or running statistics over the rows of every rank (summed by all_reduce).

    Equals `nn.BatchNorm1d(C, affine=False, track_running_stats=False)` on all ranks' rows together; a rank gets its
    own rows back. For the key head, which runs without gradient (torch.distributed's SyncBatchNorm wants CUDA).
    """

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.float()
        mean = _sum_over_ranks(torch.cat([rows.sum(dim=0), rows.new_tensor([len(rows)])]))
        count, mean = mean[-1], mean[:-1] / mean[-1]
        # Two passes: the pooled bottleneck's mean dwarfs its spread, and E[x^2] - E[x]^2 would cancel it away.
        variance = _sum_over_ranks((rows - mean).square().sum(dim=0)) / count  # biased, as BatchNorm normalises
        return ((rows - mean) * torch.rsqrt(variance + self.eps)).to(x.dtype)


def _sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values)
    return values

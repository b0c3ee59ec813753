"""SimCLR and y-aware contrastive learning (Dufumier et al., MICCAI 2021) as one loss module.

The loop augments the loader's crop twice with independent draws; both views go through the encoder, the
pooled bottleneck and a projection head (`PooledProjection`, BatchNorm over both views as SimCLR does) to
L2-normalised embeddings z. Every rank's rows are gathered with their gradient, and for each anchor i of this
rank and every other row k of the global batch

    L_i = - sum_{j != i} w_ij log( exp(z_i.z_j / t) / sum_{k != i} exp(z_i.z_k / t) )
    w_ij = K(y_i, y_j) / sum_{k != i} K(y_i, y_k)

and the loss is the mean of L_i over the anchors. SimCLR (NT-Xent): K is 1 for the anchor's own other view and
0 elsewhere. y-aware: K is a kernel on a manifest column, an RBF exp(-(y_i - y_j)^2 / (2 sigma^2)) for a
continuous one (age, in years) or exact match for a categorical one (sex); a row whose value is missing keeps
only its own other view (it is SimCLR for that row). As sigma -> 0 the RBF is 1 only for equal values, so on
distinct values the loss is SimCLR's. Dufumier et al. sum over the 2N anchors and divide by N; the mean here
is half that, the same gradient direction.

Trainer interface (shared with `training.voco.VoCoLoss` and `training.mae.MAELoss`; `training.objectives`):
    objective = ContrastiveLoss(net, ...)        # owns net.encoder and the projection head
    loss, logs = objective(batch, generator)     # batch: "views" (2 tensors (B, 1, D, H, W)), and for y-aware
                                                 #   "metadata" {column: (B,) float32 (NaN missing) or int64 (-1)}
    loss.backward(); optimizer.step(); objective.after_step()   # after_step does nothing
Under DDP the gradient through the gather is summed over ranks and DDP averages it: the global batch's gradient.
"""

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from torch import nn

from openmind_tools.errors import ConfigError
from training.config import check_ranges
from training.model import PooledProjection

KERNELS = ("rbf", "exact")


@dataclass(frozen=True)
class SimCLROptions:
    """A SimCLR stage's `options` table (ContrastiveLoss's keyword arguments), checked when the recipe loads.

    Defaults: temperature 0.1 (SimCLR's and Dufumier et al.'s); the head 512 -> 128 of Dufumier et al.'s code.
    """

    temperature: float = 0.1
    hidden_dim: int = 512
    out_dim: int = 128

    metadata: ClassVar[tuple[tuple[str, str], ...]] = ()  # (manifest column, "number" | "any")

    def __post_init__(self) -> None:
        check_ranges("options", self, temperature=(0, None, "open"), hidden_dim=(1, None), out_dim=(1, None))

    def check_size(self, out_size: int) -> None:
        """Any patch size pools to one embedding."""


@dataclass(frozen=True)
class YAwareOptions(SimCLROptions):
    """A y-aware stage's `options` table: SimCLR's plus the manifest column and the kernel on it."""

    column: str = "age"  # a manifest column; the loader puts it on every batch
    kernel: str = "rbf"  # "rbf" for a continuous column, "exact" (match) for a categorical one
    sigma: float = 5.0  # RBF bandwidth in the column's unit: Dufumier et al.'s 5 years for age

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ranges("options", self, sigma=(0, None, "open"))
        if self.kernel not in KERNELS:
            raise ConfigError(f"options.kernel: expected one of {KERNELS}, got {self.kernel!r}")

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((self.column, "number" if self.kernel == "rbf" else "any"),)


class ContrastiveLoss(nn.Module):
    """SimCLR (column=None) or y-aware InfoNCE on two views; see the module docstring for the call shape."""

    views = 2  # augmented views of each patch it takes (training.objectives.Objective)
    trains_decoder = False  # the encoder (and its head) alone: its export omits the decoder

    def __init__(
        self,
        net: ResidualEncoderUNet,
        temperature: float = 0.1,
        hidden_dim: int = 512,
        out_dim: int = 128,
        column: str | None = None,
        kernel: str = "rbf",
        sigma: float = 5.0,
    ) -> None:
        super().__init__()
        self.embed = PooledProjection(net.encoder, (hidden_dim, out_dim))
        self.temperature, self.column, self.kernel, self.sigma = temperature, column, kernel, sigma

    def forward(
        self, batch: dict[str, Any], generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        first, second = batch["views"]
        n = first.shape[0]
        z = F.normalize(self.embed(torch.cat([first, second])).float(), dim=1)  # rows: view 1, then view 2
        labels = None
        if self.column is not None:
            value = batch["metadata"][self.column]
            if self.kernel == "rbf" and not value.is_floating_point():
                raise ConfigError(f"options.kernel 'rbf' needs a numeric column; {self.column!r} is categorical "
                                  "(use kernel = \"exact\")")  # fmt: skip
            labels = torch.cat([value, value]).to(z.device)
        loss, everyone, labels = global_batch_loss(z, labels, temperature=self.temperature, kernel=self.kernel,
                                                   sigma=self.sigma)  # fmt: skip
        logs = collapse_monitors(everyone.detach(), n)
        if labels is not None:
            logs["yaware_missing"] = _missing(labels).float().mean()
        return loss, logs

    def after_step(self) -> None:
        """Nothing to update after an optimizer step; present so one loop runs every objective."""


def global_batch_loss(
    z: torch.Tensor, labels: torch.Tensor | None, *, temperature: float, kernel: str = "rbf", sigma: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """This rank's loss against every rank's rows: z (2n, E) unit rows [view 1; view 2], labels (2n,) or None.

    Returns the loss over this rank's anchors and the gathered rows and labels (ranks in order). Every rank
    must pass the same n (the loader gives every rank the same batch sizes).
    """
    n = len(z) // 2
    everyone, labels, rank = gather_rows(z, labels)
    anchors = rank * 2 * n + torch.arange(2 * n, device=z.device)
    loss = contrastive_loss(everyone, labels, pairs(len(everyone), n, z.device), anchors, temperature=temperature,
                            kernel=kernel, sigma=sigma)  # fmt: skip
    return loss, everyone, labels


def contrastive_loss(
    z: torch.Tensor,
    labels: torch.Tensor | None,
    pair: torch.Tensor,
    anchors: torch.Tensor,
    *,
    temperature: float,
    kernel: str = "rbf",
    sigma: float = 1.0,
) -> torch.Tensor:
    """Mean over `anchors` of the kernel-weighted InfoNCE of the module docstring.

    z (M, E) unit rows; labels (M,) or None (SimCLR); pair (M,) the index of each row's other view;
    anchors (A,) the rows whose loss this call computes (a rank's own rows of a gathered batch).
    """
    rows = torch.arange(len(anchors), device=z.device)
    if labels is None:
        weights = torch.zeros(len(anchors), len(z), dtype=z.dtype, device=z.device)
    else:
        weights = kernel_matrix(labels[anchors], labels, kernel, sigma).to(z.dtype)
        known = ~_missing(labels)
        weights = torch.where(known[anchors, None] & known[None, :], weights, 0.0)  # NaN * 0 would be NaN
    weights[rows, pair[anchors]] = 1.0  # the other view of the same patch is always a positive
    weights[rows, anchors] = 0.0  # never the anchor itself
    weights = weights / weights.sum(dim=1, keepdim=True)
    logits = z[anchors] @ z.T / temperature
    logits[rows, anchors] = float("-inf")
    log_prob = torch.log_softmax(logits, dim=1)
    return -torch.where(weights > 0, weights * log_prob, 0.0).sum(dim=1).mean()


def kernel_matrix(a: torch.Tensor, b: torch.Tensor, kernel: str, sigma: float) -> torch.Tensor:
    """K(a_i, b_j) for every pair: the RBF in the values' unit, or 1 where they match (categorical codes)."""
    if kernel == "exact":
        return (a[:, None] == b[None, :]).double()
    return torch.exp(-(a[:, None].double() - b[None, :].double()).square() / (2 * sigma**2))


def pairs(rows: int, n: int, device: torch.device | None = None) -> torch.Tensor:
    """The other view's row for each row of a gathered batch: ranks in order, each [view 1 (n), view 2 (n)]."""
    index = torch.arange(rows, device=device)
    return index // (2 * n) * 2 * n + (index % (2 * n) + n) % (2 * n)


def collapse_monitors(z: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
    """Signs of collapse: spread across the batch (-> 0), cosine between different patches (-> 1).

    contrast_std: the embeddings' per-dimension std across rows times sqrt(E) (about 1 when they spread over
    the sphere, 0 when collapsed); contrast_cos: mean cosine between rows of different patches; contrast_pos:
    mean cosine between a patch's two views; contrast_top1: share of rows whose nearest other row is their pair.
    """
    similarity = z @ z.T
    pair = pairs(len(z), n, z.device)
    rows = torch.arange(len(z), device=z.device)
    others = torch.ones_like(similarity, dtype=torch.bool)
    others[rows, rows] = False
    others[rows, pair] = False
    nearest = similarity.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf")).argmax(1)
    return {
        "contrast_std": z.std(dim=0).mean() * z.shape[1] ** 0.5,
        "contrast_cos": (similarity * others).sum() / others.sum().clamp_min(1),
        "contrast_pos": similarity[rows, pair].mean(),
        "contrast_top1": (nearest == pair).float().mean(),
    }


def gather_rows(z: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Every rank's rows, ranks in order (with gradient: torch.distributed.nn's all_gather), its labels alongside,
    and our rank; the rows themselves outside torchrun. Every rank must pass as many rows."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return z, labels, 0
    everyone = torch.cat(dist_fn.all_gather(z))
    if labels is not None:
        gathered = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, labels)
        labels = torch.cat(gathered)
    return everyone, labels, dist.get_rank()


def _missing(labels: torch.Tensor) -> torch.Tensor:
    return labels.isnan() if labels.is_floating_point() else labels < 0

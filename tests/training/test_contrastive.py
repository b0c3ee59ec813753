"""SimCLR and y-aware losses against an independent NumPy version, their limits, and the gathered loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchrun_contrastive import GLOBAL, SIGMA, TEMPERATURE, global_batch
from torchrun_helpers import two_ranks

from openmind_tools.errors import ConfigError
from training.contrastive import ContrastiveLoss, contrastive_loss, pairs
from training.model import resenc_tiny


def numpy_loss(first: np.ndarray, second: np.ndarray, labels, temperature: float, kernel: str, sigma: float,
               anchors=None) -> float:  # fmt: skip
    """Dufumier et al.'s loss written out row by row: rows [view 1; view 2], the pair of row i is i +- n."""
    z = np.concatenate([first, second]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n, rows = len(first), 2 * len(first)
    y = None if labels is None else np.concatenate([labels, labels]).astype(np.float64)
    losses = []
    for i in range(rows) if anchors is None else anchors:
        others = [k for k in range(rows) if k != i]
        logits = np.array([z[i] @ z[k] / temperature for k in others])
        log_norm = np.log(np.exp(logits - logits.max()).sum()) + logits.max()
        weights = []
        for k in others:
            if k == (i + n) % rows:
                weights.append(1.0)
            elif y is None or np.isnan(y[i]) or np.isnan(y[k]) or (kernel == "exact" and y[i] < 0) or (
                    kernel == "exact" and y[k] < 0):  # fmt: skip
                weights.append(0.0)
            elif kernel == "exact":
                weights.append(float(y[i] == y[k]))
            else:
                weights.append(math.exp(-((y[i] - y[k]) ** 2) / (2 * sigma**2)))
        weights = np.array(weights) / sum(weights)
        losses.append(-(weights * (logits - log_norm)).sum())
    return float(np.mean(losses))


def torch_loss(first, second, labels, temperature, kernel, sigma, anchors=None) -> float:
    z = F.normalize(torch.cat([torch.as_tensor(first), torch.as_tensor(second)]).double(), dim=1)
    y = None if labels is None else torch.cat([torch.as_tensor(labels)] * 2)
    anchors = torch.arange(len(z)) if anchors is None else torch.as_tensor(anchors)
    return contrastive_loss(z, y, pairs(len(z), len(first)), anchors, temperature=temperature, kernel=kernel,
                            sigma=sigma).item()  # fmt: skip


@pytest.fixture
def views() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(5, 16)), rng.normal(size=(5, 16))


@pytest.mark.parametrize(
    ("labels", "kernel", "sigma"),
    [
        (None, "rbf", 1.0),  # SimCLR
        (np.array([30.0, 34.0, 36.0, 67.0, 31.0]), "rbf", 5.0),
        (np.array([30.0, 34.0, np.nan, 67.0, 31.0]), "rbf", 20.0),
        (np.array([0, 1, 1, -1, 0]), "exact", 1.0),  # categorical codes, one missing
    ],
)
def test_the_loss_matches_the_numpy_version(views, labels, kernel: str, sigma: float) -> None:
    first, second = views
    expected = numpy_loss(first, second, labels, 0.1, kernel, sigma)
    assert torch_loss(first, second, labels, 0.1, kernel, sigma) == pytest.approx(expected, rel=1e-9)


def test_rbf_weights_change_the_loss(views) -> None:
    first, second = views
    ages = np.array([30.0, 34.0, 36.0, 67.0, 31.0])
    assert abs(torch_loss(first, second, ages, 0.1, "rbf", 5.0) - torch_loss(first, second, None, 0.1, "rbf", 1)) > 0.1


def test_sigma_to_zero_is_simclr(views) -> None:
    first, second = views
    ages = np.array([30.0, 34.0, 36.0, 67.0, 31.0])  # distinct values
    simclr = torch_loss(first, second, None, 0.1, "rbf", 1.0)
    assert torch_loss(first, second, ages, 0.1, "rbf", 1e-3) == pytest.approx(simclr, rel=1e-12)
    assert torch_loss(first, second, ages, 0.1, "rbf", 3.0) != pytest.approx(simclr, rel=1e-3)


def test_a_row_without_a_value_is_simclr_for_that_row_only(views) -> None:
    first, second = views
    ages = np.array([30.0, 34.0, np.nan, 35.0, 31.0])
    for row in (2, 7):  # the missing sample's two views
        assert torch_loss(first, second, ages, 0.1, "rbf", 5.0, [row]) == pytest.approx(
            torch_loss(first, second, None, 0.1, "rbf", 1.0, [row]), rel=1e-12)  # fmt: skip
    assert torch_loss(first, second, ages, 0.1, "rbf", 5.0, [0]) != pytest.approx(
        torch_loss(first, second, None, 0.1, "rbf", 1.0, [0]), rel=1e-3)  # fmt: skip


def _batch(ages: list[float]) -> dict:
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(len(ages), 1, 32, 32, 32, generator=g) for _ in range(2)]
    return {"views": views, "metadata": {"age": torch.tensor(ages), "sex": torch.tensor([0, 1, -1][: len(ages)])}}


def test_the_module_trains_the_encoder_and_logs_its_monitors() -> None:
    torch.manual_seed(0)
    net = resenc_tiny()
    objective = ContrastiveLoss(net, hidden_dim=32, out_dim=16, column="age", sigma=5.0)
    loss, logs = objective(_batch([30.0, float("nan"), 60.0]), torch.Generator())
    loss.backward()
    assert torch.isfinite(loss)
    assert set(logs) == {"contrast_std", "contrast_cos", "contrast_pos", "contrast_top1", "yaware_missing"}
    assert logs["yaware_missing"].item() == pytest.approx(1 / 3)
    assert logs["contrast_std"].item() > 0 and -1 <= logs["contrast_cos"].item() <= 1
    assert all(p.grad is not None for p in net.encoder.parameters())
    encoder = {id(p) for p in net.encoder.parameters()}  # the decoder holds a reference to the encoder
    assert all(p.grad is None for p in net.decoder.parameters() if id(p) not in encoder)  # encoder and head only


def test_an_rbf_kernel_on_a_categorical_column_is_refused() -> None:
    objective = ContrastiveLoss(resenc_tiny(), hidden_dim=8, out_dim=8, column="sex", kernel="rbf")
    with pytest.raises(ConfigError, match="'sex' is categorical"):
        objective(_batch([30.0, 40.0, 50.0]), torch.Generator())


def test_collapsed_embeddings_show_in_the_monitors() -> None:
    from training.contrastive import collapse_monitors

    collapsed = F.normalize(torch.ones(8, 16) + 1e-4 * torch.randn(8, 16), dim=1)
    spread = F.normalize(torch.randn(8, 16), dim=1)
    low, high = collapse_monitors(collapsed, 4), collapse_monitors(spread, 4)
    assert low["contrast_std"] < 0.01 < 0.5 < high["contrast_std"]
    assert low["contrast_cos"] > 0.99 > 0.5 > high["contrast_cos"]


@pytest.mark.slow
def test_the_gathered_loss_of_two_ranks_is_the_loss_of_their_global_batch(tmp_path: Path) -> None:
    done = two_ranks(str(Path(__file__).parents[1] / "torchrun_contrastive.py"), str(tmp_path), timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    first, second, labels = global_batch()
    n = GLOBAL // 2
    for kernel in ("none", "rbf"):  # SimCLR, y-aware
        z = torch.cat([first, second]).requires_grad_(True)  # one process, rows [view 1 of all; view 2 of all]
        y = None if kernel == "none" else torch.cat([labels, labels])
        loss = contrastive_loss(z, y, pairs(2 * GLOBAL, GLOBAL), torch.arange(2 * GLOBAL), temperature=TEMPERATURE,
                                kernel="rbf", sigma=SIGMA)  # fmt: skip
        loss.backward()
        assert np.mean([r[kernel]["loss"] for r in ranks]) == pytest.approx(loss.item(), rel=1e-6)
        for r in ranks:  # a rank's gradient is the sum over ranks' losses: world x the global mean's gradient
            mine = list(range(r["rank"] * n, (r["rank"] + 1) * n))
            expected = z.grad[[*mine, *(GLOBAL + i for i in mine)]]
            torch.testing.assert_close(torch.tensor(r[kernel]["grad"]) / r["world"], expected, rtol=1e-5, atol=1e-7)

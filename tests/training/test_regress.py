"""The auxiliary regression head: MSE on the z-scored column over the rows that have a value."""

from __future__ import annotations

import re

import pytest
import torch

from openmind_tools.errors import ConfigError
from training.config import StageConfig
from training.model import resenc_tiny
from training.objectives import objective_options
from training.regress import RegressionLoss


def _batch(ages: list[float]) -> dict:
    image = torch.randn(len(ages), 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    return {"image": image, "metadata": {"age": torch.tensor(ages)}}


def test_the_loss_is_the_mse_of_the_z_scored_column_over_rows_with_a_value() -> None:
    torch.manual_seed(0)
    objective = RegressionLoss(resenc_tiny(), center=40.0, scale=10.0)
    batch = _batch([30.0, float("nan"), 65.0])
    loss, logs = objective(batch, torch.Generator())
    with torch.no_grad():
        predicted = objective.head(batch["image"]).squeeze(1)
    z = torch.tensor([-1.0, 2.5])
    torch.testing.assert_close(loss, (predicted[[0, 2]] - z).square().mean())
    torch.testing.assert_close(logs["regress_mae"], (predicted[[0, 2]] - z).abs().mean() * 10)  # in years
    assert logs["regress_missing"].item() == pytest.approx(1 / 3)


def test_a_batch_without_any_value_gives_zero_and_finite_gradients() -> None:
    objective = RegressionLoss(resenc_tiny(), center=40.0, scale=10.0)
    loss, _ = objective(_batch([float("nan")] * 2), torch.Generator())
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in objective.parameters())


def test_a_categorical_column_is_refused() -> None:
    objective = RegressionLoss(resenc_tiny(), center=0.0, scale=1.0, column="sex")
    with pytest.raises(ConfigError, match="'sex' is categorical"):
        objective(
            {"image": torch.randn(2, 1, 32, 32, 32), "metadata": {"sex": torch.tensor([0, 1])}}, torch.Generator()
        )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"scale": 10.0}, "stages.r.options: missing key(s) ['center']"),
        ({"center": 40.0, "scale": 0.0}, "stages.r.options.scale: expected a value in (0, inf)"),
        ({"center": 40.0, "scale": 10.0, "column": ""}, "stages.r.options.column"),
    ],
)
def test_the_options_need_the_z_score_and_a_column(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        objective_options(StageConfig(name="r", objective="regress", manifest="unused", options=options))
    fine = StageConfig(name="r", objective="regress", manifest="unused", options={"center": 1.0, "scale": 2.0})
    assert objective_options(fine).metadata == (("age", "number"),)

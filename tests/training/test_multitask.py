"""Multi-task stages: the weighted sum of the parts on one batch, prefixed logs, every part's state, checked options."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from openmind_tools.errors import ConfigError
from training.config import StageConfig
from training.model import resenc_tiny
from training.objectives import build_objective, objective_options, trains_decoder

YAWARE = {"objective": "yaware", "options": {"hidden_dim": 16, "out_dim": 8, "sigma": 10.0}}
MAE = {"objective": "mae", "weight": 0.5, "options": {"block_size": 8}}
MOCO = {"objective": "moco", "weight": 2.0, "options": {"queue_size": 6, "hidden_dim": 16, "out_dim": 8}}
AGE = {"objective": "regress", "name": "age", "weight": 0.1, "options": {"center": 40.0, "scale": 15.0}}


def _stage(*tasks: dict) -> StageConfig:
    return StageConfig(name="mt", objective="multitask", manifest="unused", out_size=32, options={"tasks": list(tasks)})


def _batch() -> dict:
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(3, 1, 32, 32, 32, generator=g) for _ in range(2)]
    masks = torch.ones(3, 1, 32, 32, 32, dtype=torch.uint8)
    return {"image": views[0], "target": views[0], "anatomy": masks, "deface": 1 - masks, "views": views,
            "metadata": {"age": torch.tensor([30.0, 60.0, float("nan")])}}  # fmt: skip


def test_the_loss_is_the_weighted_sum_of_its_parts_on_the_same_batch_and_generator() -> None:
    torch.manual_seed(0)
    objective = build_objective(_stage(YAWARE, MAE, MOCO, AGE), resenc_tiny())
    assert objective.views == 2 and objective.trains_decoder
    loss, logs = objective(_batch(), torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)  # the parts one after the other, as the stage lists them
    parts = {name: part(_batch(), generator) for name, part in objective.tasks.items()}
    weights = {"yaware": 1.0, "mae": 0.5, "moco": 2.0, "age": 0.1}
    assert list(parts) == list(weights)
    torch.testing.assert_close(loss, sum(weights[name] * part_loss for name, (part_loss, _) in parts.items()))
    for name, (part_loss, part_logs) in parts.items():
        torch.testing.assert_close(logs[f"{name}/loss"], part_loss.detach())
        for key, value in part_logs.items():
            torch.testing.assert_close(logs[f"{name}/{key}"], value)
    assert len(logs) == len(parts) + sum(len(part_logs) for _, part_logs in parts.values())


def test_the_parts_share_one_network_and_the_state_dict_holds_each_parts_state() -> None:
    net = resenc_tiny()
    objective = build_objective(_stage(YAWARE, MOCO, AGE), net)
    encoders = {id(part_encoder) for part_encoder in (objective.tasks["yaware"].embed.encoder,
                objective.tasks["moco"].query.encoder, objective.tasks["age"].head.encoder)}  # fmt: skip
    assert encoders == {id(net.encoder)}
    state = objective.state_dict()
    assert "tasks.moco.queue" in state and "tasks.moco.queue_position" in state
    assert any(key.startswith("tasks.moco.key.") for key in state)  # the key encoder resumes too
    assert not objective.trains_decoder and not trains_decoder("multitask", {"tasks": [YAWARE, MOCO, AGE]})
    assert trains_decoder("multitask", {"tasks": [YAWARE, MAE]})  # the export then keeps the decoder


def test_the_columns_of_every_part_reach_the_loader_once() -> None:
    exact = {"objective": "yaware", "name": "by_sex", "options": {"column": "sex", "kernel": "exact"}}
    options = objective_options(_stage(YAWARE, exact, AGE, {**AGE, "name": "sex_score", "options": {
        "center": 0.0, "scale": 1.0, "column": "sex"}}))  # fmt: skip
    assert options.metadata == (("age", "number"), ("sex", "number"))  # regress needs numbers, so sex must be one


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        ([{"objective": "byol"}], "stages.mt.options.tasks.byol.objective: expected one of ['genesis', 'mae',"),
        ([{**MAE, "weight": 0.0}], "stages.mt.options.tasks[0].weight: expected a value in (0, inf), got 0.0"),
        ([{**MAE, "weight": -1.0}], "stages.mt.options.tasks[0].weight: expected a value in (0, inf)"),
        ([{**MAE, "options": {"mask_ratio": 1.5}}], "stages.mt.options.tasks.mae.options.mask_ratio: expected a value"),
        ([{**MAE, "options": {"block_size": 5}}], "stages.mt.options.tasks.mae: out_size 32 is not a multiple of"),
        ([{**AGE, "options": {"center": 1.0}}], "stages.mt.options.tasks.age.options: missing key(s) ['scale']"),
        ([MAE, {**MAE, "weight": 1.0}], "stages.mt.options.tasks[1]: a second task named 'mae'"),
        ([{"objective": "multitask"}], "stages.mt.options.tasks[0].objective: a task cannot itself be 'multitask'"),
        ([{**MAE, "wieght": 1.0}], "stages.mt.options.tasks[0]: unknown key(s) ['wieght']"),
        ([{**MAE, "name": "a.b"}], "stages.mt.options.tasks[0].name: expected letters, digits and _"),
        ([], "stages.mt.options.tasks: expected a list of tables"),
    ],
)
def test_a_mistake_in_any_task_is_named_when_the_recipe_loads(tasks: list, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        objective_options(_stage(*tasks))


@pytest.mark.parametrize(("tasks", "parts"), [([YAWARE, MAE], ["encoder", "decoder"]), ([YAWARE, AGE], ["encoder"])])
def test_the_export_keeps_the_decoder_when_a_task_trains_it(tmp_path: Path, tasks: list, parts: list) -> None:
    from training.cli import main

    stage = {"name": "mt", "objective": "multitask", "out_size": 32, "options": {"tasks": tasks}}
    (tmp_path / "config.json").write_text(json.dumps({"model": "resenc_tiny", "stages": [stage]}))
    torch.save(resenc_tiny().state_dict(), tmp_path / "mt_final.pt")
    assert main(["export", str(tmp_path), "-o", str(tmp_path / "mt.pt")]) == 0
    assert torch.load(tmp_path / "mt.pt", weights_only=True)["nnssl_adaptation_plan"]["trained_parts"] == parts

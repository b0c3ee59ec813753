"""Multi-task stages: several objectives of the registry on the same batch, their losses summed with weights.

A stage's options list its tasks (one `[[stages.options.tasks]]` table each: objective, weight, an optional name,
and that objective's own options table). Each task is its objective's loss module around the same network, so
they share the encoder (and MAE's or Genesis' decoder); each is called on the same augmented views and with the
same generator, in the listed order. The loop sees one objective: its loss is sum_i weight_i * loss_i; its logs
are each task's unweighted loss and logs under the task's name (`mae/loss`, `yaware/contrast_std`); it asks for
as many views as its most demanding task; its after_step is every task's; its state_dict holds every task's
state (MoCo's queue, VoCo's teacher) under `tasks.NAME.`; and it trains the decoder when any task does, so the
export keeps it then. The tasks each run their own forward pass: nothing is shared but the weights.

The registry (training.objectives) builds the options through `MultitaskOptions.from_table`, handing it its own
`options_of` so that each task's table is checked by that objective's own options type, and builds each task's
module: this module imports none of the objectives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from openmind_tools.errors import ConfigError
from training.config import build_dataclass, check_ranges


@dataclass(frozen=True)
class Task:
    """One `[[stages.options.tasks]]` table of a multitask stage."""

    objective: str  # an objective of training.objectives.OBJECTIVES other than "multitask"
    weight: float = 1.0  # its loss's weight in the stage's sum
    name: str = ""  # its logs' prefix and its state_dict key ("" = the objective's name)
    options: dict[str, Any] = field(default_factory=dict)  # the objective's own options table

    @property
    def label(self) -> str:
        return self.name or self.objective


@dataclass(frozen=True)
class MultitaskOptions:
    """A multitask stage's `options` table: its tasks, each with its options as its own objective's type."""

    tasks: tuple[Task, ...]
    checked: tuple[Any, ...]  # per task: its options table as its objective's options type (training.objectives)

    @classmethod
    def from_table(cls, table: dict[str, Any], options_of: Callable[[str, dict[str, Any]], Any]) -> MultitaskOptions:
        """Check `table` ({"tasks": [...]}); `options_of(objective, table)` checks each task's own options."""
        if set(table) != {"tasks"}:
            raise ConfigError(f"options: expected the key 'tasks' alone, got {sorted(table)}")
        raw = table["tasks"]
        if not (isinstance(raw, list) and raw and all(isinstance(t, dict) for t in raw)):
            raise ConfigError(f"options.tasks: expected a list of tables (a [[stages.options.tasks]] per task), "
                              f"got {raw!r}")  # fmt: skip
        tasks, checked = [], []
        for i, entry in enumerate(raw):
            where = f"options.tasks[{i}]"
            task = build_dataclass(Task, entry, where)
            check_ranges(where, task, weight=(0, None, "open"))
            if task.objective == "multitask":
                raise ConfigError(f"{where}.objective: a task cannot itself be 'multitask'")
            if not task.label.isidentifier():
                raise ConfigError(f"{where}.name: expected letters, digits and _ (a log prefix), got {task.label!r}")
            if task.label in {t.label for t in tasks}:
                raise ConfigError(f"{where}: a second task named {task.label!r}; give one of them a `name`")
            try:
                checked.append(options_of(task.objective, task.options))
            except ConfigError as e:
                raise ConfigError(f"options.tasks.{task.label}.{e}") from None
            tasks.append(task)
        return cls(tuple(tasks), tuple(checked))

    def parts(self) -> Iterator[tuple[Task, Any]]:
        """Each task with its checked options."""
        return zip(self.tasks, self.checked, strict=True)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Every task's columns, once each; a column one task needs as numbers is asked for as numbers."""
        kinds: dict[str, str] = {}
        for options in self.checked:
            for column, kind in options.metadata:
                kinds[column] = "number" if "number" in (kind, kinds.get(column)) else kind
        return tuple(kinds.items())

    def check_size(self, out_size: int) -> None:
        for task, options in self.parts():
            try:
                options.check_size(out_size)
            except ConfigError as e:
                raise ConfigError(f"options.tasks.{task.label}: {e}") from None


class MultitaskLoss(nn.Module):
    """The weighted sum of its tasks' losses on one batch; see the module docstring for the call shape."""

    def __init__(self, tasks: Sequence[tuple[str, float, nn.Module]]) -> None:
        """`tasks`: (name, weight, loss module) each, the modules built around one network."""
        super().__init__()
        self.tasks = nn.ModuleDict({name: module for name, _, module in tasks})
        self.weights = {name: weight for name, weight, _ in tasks}
        self.views = max(module.views for module in self.tasks.values())  # training.objectives.Objective
        self.trains_decoder = any(module.trains_decoder for module in self.tasks.values())

    def forward(
        self, batch: dict[str, Any], generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        weighted, logs = [], {}
        for name, task in self.tasks.items():
            loss, task_logs = task(batch, generator)
            weighted.append(self.weights[name] * loss)
            logs[f"{name}/loss"] = loss.detach()
            logs.update({f"{name}/{key}": value for key, value in task_logs.items()})
        return sum(weighted), logs

    def after_step(self) -> None:
        """Every task's after_step (VoCo's and MoCo's EMA, MoCo's queue), in the listed order."""
        for task in self.tasks.values():
            task.after_step()

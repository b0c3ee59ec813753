"""The conformance suite every entry of training.objectives passes: call shape, gradients, resume, its options.

A new objective adds its example options table to EXAMPLES (a test fails until it does) and gets these tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from openmind_tools.errors import ConfigError
from training.config import StageConfig
from training.model import resenc_tiny
from training.objectives import OBJECTIVES, build_objective, objective_options, trains_decoder

SIZE = 32  # network input edge: VoCo's 2x2x2 grid of 16^3 crops, MAE's 8^3 blocks and Genesis' windows divide it
EXAMPLES: dict[str, dict] = {  # small heads and queues: each test takes a second or two on the CI VM
    "voco": {"hidden_dim": 16, "out_dim": 16},
    "mae": {"block_size": 8},
    "simclr": {"hidden_dim": 16, "out_dim": 8},
    "yaware": {"hidden_dim": 16, "out_dim": 8, "column": "age"},
    "moco": {"queue_size": 6, "momentum": 0.5, "hidden_dim": 16, "out_dim": 8},
    "genesis": {"p_shuffle": 1.0, "p_paint": 1.0},
    "regress": {"center": 40.0, "scale": 15.0},
    "multitask": {"tasks": [{"objective": "moco", "options": {"queue_size": 6, "hidden_dim": 16, "out_dim": 8}},
                            {"objective": "genesis", "weight": 0.5},
                            {"objective": "regress", "weight": 2.0, "options": {"center": 40.0, "scale": 15.0}}]},
}  # fmt: skip


def _stage(objective: str, options: dict | None = None) -> StageConfig:
    return StageConfig(name="s", objective=objective, manifest="unused", out_size=SIZE,
                       options=EXAMPLES[objective] if options is None else options)  # fmt: skip


def _batch(seed: int = 0) -> dict:
    """What the loop hands an objective: two augmented views, the clean target, masks and an age per patch."""
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(2, 1, SIZE, SIZE, SIZE, generator=g) for _ in range(2)]
    deface = torch.zeros(2, 1, SIZE, SIZE, SIZE, dtype=torch.uint8)
    deface[:, :, :4] = 1
    return {"image": views[0], "target": views[0] + 0.1, "anatomy": 1 - deface, "deface": deface, "views": views,
            "metadata": {"age": torch.tensor([30.0, float("nan")])}}  # fmt: skip


def _build(objective: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_objective(_stage(objective), resenc_tiny())


def _step(module: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    loss, _ = module(_batch(seed), torch.Generator().manual_seed(seed))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    module.after_step()


def test_every_entry_has_an_example() -> None:
    assert set(EXAMPLES) == set(OBJECTIVES)


def test_the_config_sits_below_the_objectives_and_they_below_the_registry() -> None:
    """In a fresh interpreter, the recipe's schema and then each objective's module: none of them loads the
    registry, and the schema loads no objective (the circle config -> objectives -> voco -> config stays broken)."""
    modules = sorted({loss.__module__ for loss, _ in OBJECTIVES.values()})
    probe = (f"import importlib, sys\nfor name in ['training.config', *{modules!r}]:\n"
             "    importlib.import_module(name)\n"
             "    loaded = {m for m in sys.modules if m.startswith('training.')}\n"
             "    assert 'training.objectives' not in loaded, name\n"
             f"    assert name != 'training.config' or not loaded & set({modules!r}), loaded")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_a_call_gives_a_finite_scalar_loss_and_detached_scalar_logs(objective: str) -> None:
    module = _build(objective)
    loss, logs = module(_batch(), torch.Generator().manual_seed(0))
    assert loss.shape == () and torch.isfinite(loss) and loss.requires_grad
    assert logs and all(v.shape == () and not v.requires_grad and torch.isfinite(v) for v in logs.values()), logs
    assert module.views in (1, 2)


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_every_trainable_parameter_gets_a_gradient_and_the_decoder_one_only_if_it_trains(objective: str) -> None:
    net = resenc_tiny()
    module = build_objective(_stage(objective), net)
    loss, _ = module(_batch(), torch.Generator().manual_seed(0))
    loss.backward()
    unused = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused  # DDP wraps every objective without find_unused_parameters
    encoder = {id(p) for p in net.encoder.parameters()}  # the decoder holds a reference to the encoder
    decoder = [p for p in net.decoder.parameters() if id(p) not in encoder and p.requires_grad]
    assert module.trains_decoder == trains_decoder(objective, EXAMPLES[objective])
    assert all((p.grad is not None) == module.trains_decoder for p in decoder)


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_a_rebuilt_module_resumes_from_the_state_dict(objective: str) -> None:
    trained = _build(objective, seed=0)
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        _step(trained, optimizer, step)
    resumed = _build(objective, seed=1)  # other initial weights (and, had it a random one, queue)
    resumed.load_state_dict(trained.state_dict())
    losses = []
    for module in (trained, resumed):  # one more step without the optimizer: the losses, then the states, agree
        loss, _ = module(_batch(2), torch.Generator().manual_seed(2))
        module.after_step()
        losses.append(loss.item())
    assert losses[0] == losses[1]
    expected = trained.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in resumed.state_dict().items())


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_an_unknown_option_is_refused_by_name(objective: str) -> None:
    with pytest.raises(ConfigError, match=r"stages\.s\.options.*'bogus'"):
        objective_options(_stage(objective, {**EXAMPLES[objective], "bogus": 1}))


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_the_export_holds_the_decoder_exactly_when_the_entry_trains_it(objective: str, tmp_path: Path) -> None:
    from training.cli import main

    stage = {"name": "s", "objective": objective, "out_size": SIZE, "options": EXAMPLES[objective]}
    (tmp_path / "config.json").write_text(json.dumps({"model": "resenc_tiny", "stages": [stage]}))
    torch.save(resenc_tiny().state_dict(), tmp_path / "s_final.pt")
    assert main(["export", str(tmp_path), "-o", str(tmp_path / "s.pt")]) == 0
    export = torch.load(tmp_path / "s.pt", weights_only=True)
    decoder = trains_decoder(objective, EXAMPLES[objective])
    assert export["nnssl_adaptation_plan"]["trained_parts"] == (["encoder", "decoder"] if decoder else ["encoder"])
    assert any(key.startswith("decoder.") for key in export["network_weights"]) == decoder

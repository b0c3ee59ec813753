"""MoCo: InfoNCE with a queue against NumPy, the queue's ring buffer, the key head's gathered BN, and a 2-rank queue."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torchrun_helpers import two_ranks
from torchrun_moco import GLOBAL, LR, OPTIONS, STEPS, build, global_views

import training.train
from training.config import load_config
from training.moco import GatheredBatchNorm, MoCoLoss, queue_loss
from training.model import resenc_tiny

RECIPE = Path(__file__).parents[2] / "training" / "configs" / "demo_moco.toml"
TOLERANCE = 2e-3  # of the 2-rank run against one process (see the comment there)


def numpy_queue_loss(q: np.ndarray, k: np.ndarray, queue: np.ndarray, temperature: float) -> float:
    """MoCo's loss written out row by row: the key is the positive, every queue row a negative."""
    losses = []
    for qi, ki in zip(q.astype(np.float64), k.astype(np.float64), strict=True):
        logits = np.concatenate([[qi @ ki], queue.astype(np.float64) @ qi]) / temperature
        losses.append(np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[0])
    return float(np.mean(losses))


def test_the_loss_matches_the_numpy_version() -> None:
    rng = np.random.default_rng(0)
    q, k, queue = (rng.normal(size=shape) for shape in ((5, 8), (5, 8), (7, 8)))
    q, k, queue = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (q, k, queue))
    got = queue_loss(*(torch.from_numpy(x) for x in (q, k, queue)), temperature=0.2).item()
    assert got == pytest.approx(numpy_queue_loss(q, k, queue, 0.2), rel=1e-9)


def test_the_queue_is_a_ring_that_keeps_the_newest_keys() -> None:
    objective = MoCoLoss(resenc_tiny(), queue_size=5, hidden_dim=8, out_dim=2)
    first = objective.queue.clone()
    keys = torch.arange(14, dtype=torch.float32).view(7, 2)
    objective.enqueue(keys[:3])
    assert torch.equal(objective.queue[:3], keys[:3]) and torch.equal(objective.queue[3:], first[3:])
    objective.enqueue(keys[3:6])  # wraps: rows 3, 4, then 0
    assert torch.equal(objective.queue, torch.stack([keys[5], keys[1], keys[2], keys[3], keys[4]]))
    assert int(objective.queue_position) == 1
    objective.enqueue(torch.arange(24, dtype=torch.float32).view(12, 2))  # more than K: the last 5 stay
    assert sorted(objective.queue[:, 0].tolist()) == [14.0, 16.0, 18.0, 20.0, 22.0]


def test_gathered_batch_norm_is_batch_norm_on_one_process() -> None:
    rows = torch.randn(6, 5) * 3 + 1
    expected = torch.nn.BatchNorm1d(5, affine=False, track_running_stats=False)(rows)
    torch.testing.assert_close(GatheredBatchNorm()(rows), expected, rtol=1e-5, atol=1e-5)


def test_a_step_enqueues_its_keys_then_moves_the_key_encoder() -> None:
    torch.manual_seed(0)
    objective = MoCoLoss(resenc_tiny(), momentum=0.75, queue_size=6, hidden_dim=16, out_dim=8)
    first, second = global_views(0)
    loss, logs = objective({"views": [first, second]}, torch.Generator())
    loss.backward()
    assert {"contrast_std", "contrast_cos", "contrast_pos", "contrast_top1", "moco_queue_cos"} == set(logs)
    assert all(p.grad is not None for p in objective.query.parameters())
    assert all(p.grad is None and not p.requires_grad for p in objective.key.parameters())
    with torch.no_grad():
        for p in objective.query.parameters():  # as if the optimizer had stepped
            p.add_(torch.randn_like(p))
        keys = F.normalize(objective.key(second), dim=1)  # the keys the forward computed (key unchanged since)
    key_before = [p.clone() for p in objective.key.parameters()]
    objective.after_step()
    torch.testing.assert_close(objective.queue[:GLOBAL], keys)
    assert int(objective.queue_position) == GLOBAL
    for after, before, query in zip(objective.key.parameters(), key_before, objective.query.parameters(), strict=True):
        torch.testing.assert_close(after, 0.75 * before + 0.25 * query)


@pytest.mark.slow
def test_two_ranks_hold_the_queue_of_their_global_batch(tmp_path: Path) -> None:
    done = two_ranks(str(Path(__file__).parents[1] / "torchrun_moco.py"), str(tmp_path), timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["queue"] == ranks[1]["queue"] and ranks[0]["position"] == ranks[1]["position"]  # bit for bit
    # The tiny net's pooled bottleneck barely varies between noise patches and the heads' BN divides by that spread,
    # so a rounding of 1e-7 (another thread count, another split of the batch) grows to ~3e-4 in a step (measured);
    # a missing rank's keys, a skipped update or a wrong gradient is off by O(0.1) or more.
    # One process, the parts assembled by hand: each rank's queries (its BN over its own rows), every key (the key
    # head's BN over the global batch), DDP's gradient (the mean of the ranks' losses), then enqueue all keys.
    objective = build()
    optimizer = torch.optim.SGD([p for p in objective.parameters() if p.requires_grad], lr=LR)
    n = GLOBAL // 2
    for step in range(STEPS):
        first, second = global_views(step)
        with torch.no_grad():
            keys = F.normalize(objective.key(second), dim=1)
        losses = [queue_loss(F.normalize(objective.query(first[r * n : (r + 1) * n]), dim=1), keys[r * n : (r + 1) * n],
                             objective.queue, OPTIONS["temperature"]) for r in range(2)]  # fmt: skip
        for r in range(2):
            assert ranks[r]["losses"][step] == pytest.approx(losses[r].item(), rel=TOLERANCE), (step, r)
        torch.stack(losses).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objective.enqueue(keys)
        for slow, fast in zip(objective.key.parameters(), objective.query.parameters(), strict=True):
            slow.data.mul_(OPTIONS["momentum"]).add_(fast.data, alpha=1 - OPTIONS["momentum"])
    torch.testing.assert_close(torch.tensor(ranks[0]["queue"]), objective.queue, rtol=0, atol=5 * TOLERANCE)
    assert ranks[0]["position"] == STEPS * GLOBAL % OPTIONS["queue_size"]


@pytest.mark.slow
def test_a_stopped_run_resumes_its_queue_and_key_encoder_exactly(
    demo_out: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop's own checkpoint carries the queue: stopped after step 4 (checkpoint at 3), then resumed, a run ends
    with the queue, write position, key encoder and weights of a run that never stopped."""

    def config(out: Path):
        return load_config(RECIPE, [f"--run.out={json.dumps(str(out))}", "--run.checkpoint_every=3",
                                    f"--stages.moco.manifest={json.dumps(str(demo_out / 'manifest.parquet'))}",
                                    "--stages.moco.max_steps=6", "--stages.moco.num_workers=0",
                                    "--stages.moco.batch_size=2", "--stages.moco.patch_size=32",
                                    "--stages.moco.out_size=32", "--stages.moco.options.queue_size=5"])  # fmt: skip

    training.train.train(config(tmp_path / "straight"))
    step = training.train.train_step
    calls = []

    def stops_at_the_fourth_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # as a user's Ctrl-C: after checkpoint 3, before step 4 ends
        return step(*args, **kwargs)

    run = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        patch.setattr(training.train, "train_step", stops_at_the_fourth_step)
        with pytest.raises(KeyboardInterrupt):
            training.train.train(config(run))
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 3
    training.train.train(config(run), resume=True)
    straight, resumed = (torch.load(out / "checkpoint.pt", weights_only=True) for out in (tmp_path / "straight", run))
    assert resumed["step"] == straight["step"] == 6
    assert int(resumed["objective"]["queue_position"]) == 6 * 2 % 5  # 12 keys went through a queue of 5
    for key, value in straight["objective"].items():  # queue, key encoder, encoder and head
        torch.testing.assert_close(resumed["objective"][key], value, rtol=0, atol=0, msg=key)
    log = pd.read_csv(run / "moco_log.csv")  # the collapse monitors reach the log, each row once
    monitors = log[["contrast_std", "contrast_cos", "moco_queue_cos"]]
    assert list(log["step"]) == [5, 6] and monitors.notna().all(axis=None)

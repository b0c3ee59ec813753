"""The training loop: VoCo then MAE (or any other objective) on ResEnc, from the stores, under torchrun.

config -> distributed init (torchrun env; nccl on GPU, gloo on CPU) -> per stage: model, objective,
optimizer, schedule, loader, GPU augmentation -> resume -> loop -> checkpoint, export, loss plot. Read top
to bottom. Every objective is a loss module with one call shape (training.objectives), so one loop runs
them all. A checkpoint holds model, optimizer, scheduler, augmentation and loader state, step and RNGs, and
is written atomically; `resume=True` continues as if the run had never stopped.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from openmind_tools.augment import AugmentSettings, GPUAugment
from openmind_tools.errors import ConfigError, StoreError
from openmind_tools.files import atomic_write, atomic_write_text, remove_stale_temporaries
from openmind_tools.loader import PatchDataset, make_loader, typed_metadata
from openmind_tools.manifest import EmptyResultWarning, balance_groups, resolve_manifest, write_manifest
from training.config import RunConfig, StageConfig
from training.model import PRESETS, export_encoder, nnssl_pretrain_plan
from training.objectives import build_objective, objective_options

CHECKPOINT = "checkpoint.pt"


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Run every stage of `cfg`; returns the run folder.

    One training per run folder: a second one into it is refused while the first holds its lock, and a new
    run into a folder that holds a finished or stopped one is refused unless `resume` (continue it) or
    `overwrite` (delete its checkpoint, logs and weights first) says what to do.
    """
    ddp = "RANK" in os.environ
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if ddp:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    master = rank == 0
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    out = Path(cfg.out)
    if resume and not (out / CHECKPOINT).is_file():  # before the lock: a refused resume creates nothing
        raise ConfigError(f"{out / CHECKPOINT}: nothing to resume")
    selections = [_select(stage) for stage in cfg.stages]  # a bad options table or an empty stage fails here
    with contextlib.ExitStack() as held:
        if master:
            held.enter_context(_exclusive(out))
        _train_locked(cfg, resume, overwrite, ddp, device, rank, world, master, out, selections)
    return out


def _train_locked(cfg, resume, overwrite, ddp, device, rank, world, master, out, selections) -> None:
    if master:
        remove_stale_temporaries(out)  # a checkpoint write killed half-way left GBs under a temporary name
    if not resume and master and _holds_run(out):
        if not overwrite:
            raise ConfigError(f"{out} holds a run: --resume {out} continues it, --overwrite starts afresh (deleting "
                              "its checkpoint, logs and weights), or choose another --run.out")  # fmt: skip
        _delete_run(out, [stage.name for stage in cfg.stages])
    state = _load_checkpoint(out / CHECKPOINT) if resume else None
    if state is not None and state["config"] != _plain(cfg):
        changed = sorted(k for k in _plain(cfg) if _plain(cfg)[k] != state["config"].get(k))
        raise ConfigError(f"{out}: --resume needs the config the run started with; these differ: {changed}")
    if master and state is None:  # a resumed run keeps the files its start wrote
        atomic_write_text(out / "config.json", json.dumps(_plain(cfg), indent=1))
        for stage, (rows, meta) in zip(cfg.stages, selections, strict=True):
            write_manifest(rows, out / f"{stage.name}_manifest.parquet", meta)  # what this stage trains on
    try:
        for index, stage in enumerate(cfg.stages):
            if state is not None and index < state["stage"]:
                continue
            stage_state = state if state is not None and index == state["stage"] else None
            _run_stage(cfg, index, stage, selections[index], stage_state, device, rank, world, master, out)
    finally:
        if ddp:
            dist.destroy_process_group()


@contextlib.contextmanager
def _exclusive(out: Path):
    """One training per run folder (two would race on the checkpoint): a lock held for the whole run.

    A POSIX record lock (lockf), not flock: forked DataLoader workers do not inherit it, so a killed
    trainer's orphaned workers cannot keep the folder locked.
    """
    out.mkdir(parents=True, exist_ok=True)
    with (out / ".lock").open("a") as lock:
        try:
            fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EACCES or EAGAIN: held by another process
            raise ConfigError(f"{out}: another openmind-train is running in this folder") from None
        yield


def _holds_run(out: Path) -> bool:
    return any((out / name).exists() for name in ("config.json", CHECKPOINT)) or any(out.glob("*_log.csv"))


def _delete_run(out: Path, stages: list[str]) -> None:
    """--overwrite: remove what the earlier run wrote, so no old log row or weight survives into the new run, and
    nothing else: its config.json records its stages, which name its files (`stages` is the fallback when that is
    gone). A user's own files in the folder, other CSVs and TensorBoard runs included, stay."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        stages = [stage["name"] for stage in json.loads((out / "config.json").read_text())["stages"]]
    names = ["config.json", CHECKPOINT]
    for stage in stages:
        names += [f"{stage}_{suffix}" for suffix in ("final.pt", "encoder.pt", "loss.png", "manifest.parquet",
                                                     "log.csv")]  # fmt: skip
        board = out / "tensorboard" / stage
        names += [str(p.relative_to(out)) for p in board.glob("events.out.tfevents.*")] if board.is_dir() else []
    for name in names:
        (out / name).unlink(missing_ok=True)
    for folder in [out / "tensorboard" / stage for stage in stages] + [out / "tensorboard"]:
        with contextlib.suppress(OSError):  # only if now empty
            folder.rmdir()


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or foreign file fails in many ways (pickle, zip, EOF); all mean this
        raise ConfigError(f"{path}: not a checkpoint that loads ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not {"config", "stage", "step"} <= set(state):
        raise ConfigError(f"{path}: not a checkpoint of openmind-train")
    return state


def _run_stage(
    cfg: RunConfig,
    index: int,
    stage: StageConfig,
    selection: tuple[pd.DataFrame, dict[str, Any]],
    state: dict[str, Any] | None,
    device: torch.device,
    rank: int,
    world: int,
    master: bool,
    out: Path,
) -> None:
    torch.manual_seed(cfg.seed + 1000 * index + rank)
    # data (a stage that selects nothing fails here, before the model is built)
    rows, meta = selection
    dataset = PatchDataset(
        rows,
        stage.patch_size,
        root=meta.get("store_root"),
        store=stage.store,
        crops_per_volume=stage.crops_per_volume,
        foreground_bias=stage.foreground_bias,
        seed=cfg.seed + index,
        on_error=stage.on_error,
        metadata=[column for column, _ in objective_options(stage).metadata],
        balance_by=stage.balance_columns,
    )
    loader = make_loader(dataset, stage.batch_size, num_workers=stage.num_workers, device=device)
    schedule_steps = stage.epochs * len(loader)  # max_steps stops early without changing the schedule
    total_steps = schedule_steps if stage.max_steps is None else min(schedule_steps, stage.max_steps)
    augment = GPUAugment(AugmentSettings.from_dict({"out_size": stage.out_size, "seed": cfg.seed + 7919 * rank,
                                                    **stage.augment}))  # fmt: skip
    generator = torch.Generator().manual_seed(cfg.seed + 104729 * rank + index)

    init = out / f"{stage.init_from}_final.pt" if stage.init_from is not None else None
    t = build_trainable(cfg.model, stage, device, world, schedule_steps, init, compile=cfg.compile,
                        channels_last=cfg.channels_last)  # fmt: skip
    autocast = _autocast(device)

    # resume
    step = 0
    if state is not None:
        t.objective.load_state_dict(state["objective"])
        t.optimizer.load_state_dict(state["optimizer"])
        t.scheduler.load_state_dict(state["scheduler"])
        augment.load_state_dict(state["augment"][rank])
        loader.load_state_dict(state["loader"][rank])
        generator.set_state(state["generator"][rank])
        torch.set_rng_state(state["torch_rng"][rank])
        step = state["step"]

    # loop
    log = _Log(out / f"{stage.name}_log.csv", stage.name, step if state is not None else None) if master else None
    bar = tqdm(total=total_steps, initial=step, desc=stage.name, disable=not master, unit="step")
    wait, steps, since, loss_sum = 0.0, 0, time.perf_counter(), torch.zeros((), device=device)
    logs_sum: dict[str, torch.Tensor] = {}  # the objective's logs summed over the interval, as the loss is
    skipped, per_rank = 0, math.ceil(len(dataset.volumes) / world)  # volumes replaced in this interval
    while step < total_steps:
        skipped_in_epoch = 0
        for batch in loader:
            wait += loader.wait_s
            skipped, skipped_in_epoch = skipped + batch["skipped"], skipped_in_epoch + batch["skipped"]
            if skipped_in_epoch > stage.max_skipped * per_rank:
                raise StoreError(f"stages.{stage.name}: {skipped_in_epoch} of the {per_rank} volumes rank {rank} "
                                 f"reads per epoch could not be read, more than max_skipped={stage.max_skipped} "
                                 "(the log names them)")  # fmt: skip
            loss, logs = train_step(t, augment, batch, generator, autocast, stage.grad_clip)
            step, steps, loss_sum = step + 1, steps + 1, loss_sum + loss.detach()
            logs_sum = {key: logs_sum.get(key, 0.0) + value for key, value in logs.items()}
            if step % cfg.log_every == 0 or step == total_steps:
                value = float(loss_sum) / steps  # the interval's mean loss: the one host sync per interval on a rank
                elapsed = time.perf_counter() - since
                stall, patches_s = wait / elapsed, steps * stage.batch_size * world / elapsed
                if master:
                    means = {key: float(total) / steps for key, total in logs_sum.items()}  # and rank 0's logs
                    bar.set_postfix(loss=f"{value:.4f}", stall=f"{stall:.1%}", patches_s=f"{patches_s:.1f}")
                    log.write(step, value, t.scheduler.get_last_lr()[0], 1e3 * elapsed / steps, stall, patches_s,
                              {"skipped_volumes": skipped, **means})  # fmt: skip
                wait, steps, since, loss_sum = 0.0, 0, time.perf_counter(), torch.zeros((), device=device)
                logs_sum = {}
                skipped = 0
            bar.update()
            if step % cfg.checkpoint_every == 0 or step == total_steps:
                _checkpoint(cfg, out, index, step, t, augment, loader, generator, master)
            if step == total_steps:
                break
    bar.close()
    loader.close()
    if master:
        with atomic_write(out / f"{stage.name}_final.pt") as f:  # init_from and export read it back
            torch.save(t.net.state_dict(), f)
        plan = nnssl_pretrain_plan(patch_size=(stage.out_size,) * 3, spacing=stage_spacing(rows))
        decoder = "trained" if t.objective.trains_decoder else "omitted"
        export_encoder(t.net, cfg.model, out / f"{stage.name}_encoder.pt", plan, decoder=decoder)
        if log.path.exists():  # a stage stopped at step 0 has nothing to plot
            log.plot(out / f"{stage.name}_loss.png")
        log.close()
    if world > 1:
        dist.barrier()


@dataclass(frozen=True)
class Trainable:
    net: nn.Module  # the plain ResEnc U-Net: what is saved and exported
    objective: nn.Module  # the stage's loss module (training.objectives) owning `net` or its encoder
    model: nn.Module  # the objective as called: DDP- and/or compile-wrapped
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    params: list[torch.Tensor]
    memory_format: torch.memory_format = torch.contiguous_format  # of the network inputs (channels_last_3d)


def build_trainable(
    model_name: str,
    stage: StageConfig,
    device: torch.device,
    world: int,
    schedule_steps: int,
    init: Path | None = None,
    compile: bool = False,
    channels_last: bool = False,
) -> Trainable:
    """Network, objective, optimizer and schedule of a stage; `init` holds a finished stage's weights."""
    net = PRESETS[model_name]()
    if init is not None:
        start = torch.load(init, map_location="cpu", weights_only=True)
        encoder = {k.removeprefix("encoder."): v for k, v in start.items() if k.startswith("encoder.")}
        net.encoder.load_state_dict(encoder, strict=True)
    objective = build_objective(stage, net)
    objective.to(device)
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    objective.to(memory_format=memory_format)  # conv weights; train_step converts the inputs alike
    params = [p for p in objective.parameters() if p.requires_grad]
    if stage.optimizer == "sgd":  # nnU-Net / nnssl: nesterov, momentum 0.99
        optimizer = torch.optim.SGD(params, lr=stage.lr, momentum=0.99, nesterov=True, weight_decay=stage.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _poly_with_warmup(stage.warmup_steps, schedule_steps))
    model = DDP(objective) if world > 1 else objective
    model = torch.compile(model) if compile else model
    return Trainable(net, objective, model, optimizer, scheduler, params, memory_format)


def train_step(
    t: Trainable,
    augment: GPUAugment,
    batch: dict[str, Any],
    generator: torch.Generator,
    autocast: contextlib.AbstractContextManager,
    grad_clip: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Augment on the device (each view its own draws), forward under autocast, clip, step; no host sync."""
    views = [augment(batch["image"], masks=(batch["anatomy"], batch["deface"])) for _ in range(t.objective.views)]
    images = [view.image.float().contiguous(memory_format=t.memory_format) for view in views]
    first = views[0]
    inputs = {"image": images[0], "target": first.target.float(), "anatomy": first.masks[0],
              "deface": first.masks[1], "views": images, "metadata": batch.get("metadata", {})}  # fmt: skip
    with autocast:
        loss, logs = t.model(inputs, generator)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(t.params, grad_clip)
    t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    t.scheduler.step()
    t.objective.after_step()
    return loss, logs


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 on GPU (no loss scaler needed); full precision on CPU, where bf16 convolutions are slow."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def _select(stage: StageConfig) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The stage's manifest query, resolved, after its objective's options table is checked (the recipe's schema
    leaves that table to the registry); either mistake, or selecting nothing, is a ConfigError naming the stage."""
    wanted = objective_options(stage).metadata
    given = (("preset", stage.preset), ("min_quality", stage.min_quality), ("exclude", stage.exclude_paths or None))
    filters = {k: v for k, v in given if v is not None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmptyResultWarning)  # turned into the error below
        rows, meta = resolve_manifest(stage.manifest, **filters)
    if rows.empty:
        raise ConfigError(
            f"stages.{stage.name}: {meta.get('query', 'the manifest')} of {stage.manifest} selects no volume"
        )
    try:  # the columns balance_by and the objective name must be in it, and hold what the objective needs
        if stage.balance_columns:
            balance_groups(rows, stage.balance_columns)
        categories, _ = typed_metadata(rows, tuple(column for column, _ in wanted))
    except ConfigError as e:
        raise ConfigError(f"stages.{stage.name}: {e}") from None
    for column, kind in wanted:
        if kind == "number" and categories[column] is not None:
            raise ConfigError(f"stages.{stage.name}.options: objective {stage.objective!r} needs numbers in column "
                              f"{column!r}, which holds categories {categories[column][:5]}")  # fmt: skip
    return rows, meta


def stage_spacing(rows: pd.DataFrame) -> tuple[float, float, float]:
    """The voxel spacing (mm) a stage trained at, as its export records it: the median of its manifest's `spacing`
    (one value when converted with one setting), else 1 mm. A fine-tuning reads the downstream data at it."""
    if "spacing" not in rows or rows["spacing"].isna().all():
        return (1.0, 1.0, 1.0)
    median = np.median(np.array([list(v) for v in rows["spacing"].dropna()], dtype=float), axis=0)
    return tuple(float(v) for v in median)


def _plain(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as JSON types: saved in config.json and in every checkpoint."""
    return json.loads(json.dumps(cfg.to_dict(), default=str))


def _poly_with_warmup(warmup: int, total: int):
    """Linear warm-up, then nnU-Net's poly decay (1 - t)^0.9."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, 1 - (step - warmup) / max(1, total - warmup)) ** 0.9

    return factor


def _checkpoint(cfg, out, index, step, t: Trainable, augment, loader, generator, master) -> None:
    """Gather every rank's loader/augmentation/RNG state; rank 0 writes the file atomically."""
    local = {"augment": augment.state_dict(), "loader": loader.state_dict(), "generator": generator.get_state(),
             "torch_rng": torch.get_rng_state()}  # fmt: skip
    gathered = [local]
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
    if not master:
        return
    state = {
        "config": _plain(cfg),
        "stage": index,
        "step": step,
        "objective": t.objective.state_dict(),
        "optimizer": t.optimizer.state_dict(),
        "scheduler": t.scheduler.state_dict(),
        **{key: [g[key] for g in gathered] for key in local},
    }
    with atomic_write(out / CHECKPOINT) as f:
        torch.save(state, f)


class _Log:
    """A stage's log: STAGE_log.csv (one row per interval: its mean loss and objective logs), TensorBoard scalars if
    installed, the loss plot."""

    def __init__(self, path: Path, stage: str, resumed_at: int | None = None) -> None:
        self.path, self.stage = path, stage
        if resumed_at is not None and path.exists():  # drop rows a killed run logged after its last checkpoint
            rows = pd.read_csv(path)
            atomic_write_text(path, rows[rows["step"] <= resumed_at].to_csv(index=False))
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # TensorBoard is optional; the CSV has everything
            self.board = None
        else:
            self.board = SummaryWriter(str(path.parent / "tensorboard" / stage), purge_step=resumed_at)

    def write(self, step, loss, lr, ms_step, stall, patches_s, extra: dict[str, float]) -> None:
        row = {"stage": self.stage, "step": step, "loss": loss, "lr": lr, "ms_per_step": ms_step,
               "data_stall": stall, "patches_per_s": patches_s, **extra}  # fmt: skip
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
        if self.board is not None:
            for key, value in row.items():
                if key not in ("stage", "step"):
                    self.board.add_scalar(f"{self.stage}/{key}", value, step)
            self.board.flush()

    def close(self) -> None:
        if self.board is not None:
            self.board.close()

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = pd.read_csv(self.path, usecols=["step", "loss"])
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(rows["step"], rows["loss"], marker=".")
        ax.set(xlabel="step", ylabel=f"{self.stage} loss", title=f"stage {self.stage}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

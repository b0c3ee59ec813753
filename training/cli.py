"""`openmind-train`: run a recipe (VoCo -> MAE), resume it, or export its encoder for nnU-Net.

openmind-train training/configs/demo.toml [--run.out=runs/x] [--stages.mae.max_steps=10]
torchrun --nproc_per_node 8 -m training training/configs/voco_then_mae.toml
openmind-train CONFIG --resume runs/NAME
openmind-train export runs/NAME -o encoder.pt [--stage mae] [--plans nnUNet_preprocessed/DATASET/PLANS.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from openmind_tools.cli.common import existing_dir, existing_parent, run_command
from openmind_tools.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "export":
        return run_command("openmind-train export", lambda: _export_parser().parse_args(argv[1:]), _export)
    return run_command("openmind-train", lambda: _train_parser().parse_known_args(argv), _train)


# What an export holds, by training.model.DECODER_CHOICES
_HELD = {
    "trained": "encoder and decoder, both trained",
    "omitted": "the encoder alone (the objective trains no decoder)",
    "nnunet_init": "the trained encoder, and a decoder at nnU-Net's own initialisation (the objective trains none)",
}


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="openmind-train",
        description="Pretrain ResEnc with the stages of a TOML recipe (VoCo, then MAE) from openmind-convert "
        "stores. Run under torchrun for several GPUs/nodes. Extra --run.KEY=VALUE / --stages.NAME.KEY=VALUE "
        "arguments override the recipe. Subcommand: 'openmind-train export RUN -o encoder.pt'.",
        epilog="Exit status: 0 done, 2 bad arguments or recipe (checked before any work), 3 an unreadable store, "
        "4 the machine failed (disk full, I/O error).",
    )
    p.add_argument("config", help="recipe, e.g. training/configs/demo.toml")
    p.add_argument("--resume", metavar="RUN", help="continue the run in folder RUN exactly where it stopped")
    p.add_argument("--overwrite", action="store_true", help="start afresh in a run folder that holds a run")
    return p


def _train(parsed: tuple[argparse.Namespace, list[str]]) -> int:
    args, overrides = parsed
    from training.config import load_config
    from training.train import train

    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite: choose one")
    if args.resume:
        overrides.append(f"--run.out={json.dumps(args.resume)}")
    cfg = load_config(args.config, overrides)
    out = train(cfg, resume=bool(args.resume), overwrite=args.overwrite)
    print(f"run folder: {out} (per-stage *_log.csv, *_loss.png, *_encoder.pt for nnU-Net ResEnc fine-tuning)")
    return 0


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="openmind-train export",
        description="Write a stage's weights with the nnssl adaptation plan nnU-Net's ResEnc fine-tuning reads; "
        "the weights are checked by a strict load into a fresh network before anything is written. A stage whose "
        "objective trains the encoder alone (voco, simclr, yaware, moco, regress) exports the encoder alone.",
    )
    p.add_argument("run", type=existing_dir, help="run folder written by openmind-train")
    p.add_argument("-o", "--output", required=True, type=existing_parent, help="file to write, e.g. encoder.pt")
    p.add_argument("--stage", help="stage to export (default: the last one)")
    p.add_argument(
        "--plans",
        type=Path,
        help="for released nnU-Net's 'nnUNetv2_train -pretrained_weights': an nnU-Net plans file "
        "(nnUNet_preprocessed/DATASET/nnUNetResEncUNetLPlans.json, say) to copy beside itself with the export's "
        "architecture and patch size. nnU-Net's loader needs every key, so an encoder-only stage's export then "
        "carries a decoder drawn with nnU-Net's own initialisation",
    )
    p.add_argument("--plans-name", help="name of the plans written, for nnUNetv2_train -p (default: the source "
                   "plans' name, '_' and the output's stem, e.g. nnUNetResEncUNetLPlans_mae)")  # fmt: skip
    p.add_argument("--configuration", default="3d_fullres", help="configuration of --plans to rewrite")
    p.add_argument(
        "--patch-size",
        type=_patch_size,
        help="patch of the written plans: an edge (160) or D,H,W (default: the export's recommended 160^3)",
    )
    return p


def _patch_size(text: str) -> tuple[int, ...]:
    try:
        edges = tuple(int(edge) for edge in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an edge (160) or D,H,W, got {text!r}") from None
    if len(edges) not in (1, 3) or min(edges) < 1:
        raise argparse.ArgumentTypeError(f"expected one or three positive edges, got {text!r}")
    return edges * 3 if len(edges) == 1 else edges


def _export(args: argparse.Namespace) -> int:
    import pandas as pd
    import torch

    from training.model import PRESETS, adaptation_plan, export_encoder, nnssl_pretrain_plan
    from training.nnunet_plans import load_plans, plans_for_export, write_plans
    from training.objectives import OBJECTIVES, trains_decoder
    from training.train import stage_spacing

    try:
        cfg = json.loads((Path(args.run) / "config.json").read_text())
        stages = {s["name"]: s for s in cfg["stages"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{args.run}: not a run folder of openmind-train ({type(e).__name__}: {e})") from None
    name = args.stage or cfg["stages"][-1]["name"]
    if name not in stages:
        raise ConfigError(f"--stage: {name!r} is not one of {list(stages)}")
    weights = Path(args.run) / f"{name}_final.pt"
    if not weights.is_file():
        raise ConfigError(f"{weights}: stage {name!r} has not finished in {args.run}")
    if cfg.get("model") not in PRESETS:
        raise ConfigError(f"{args.run}/config.json: model {cfg.get('model')!r} is not one of {sorted(PRESETS)}")
    objective = stages[name].get("objective")
    if objective not in OBJECTIVES:
        raise ConfigError(f"{args.run}/config.json: stage {name!r} has objective {objective!r}, not one of "
                          f"{sorted(OBJECTIVES)}")  # fmt: skip
    net = PRESETS[cfg["model"]]()
    try:
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    except Exception as e:  # a damaged or foreign file fails in many ways; all mean the same here
        raise ConfigError(f"{weights}: not the weights of {cfg['model']} ({type(e).__name__}: {e})") from None
    try:
        trained = trains_decoder(objective, stages[name].get("options", {}))
    except ConfigError as e:
        raise ConfigError(f"{args.run}/config.json: stage {name!r}: {e}") from None
    decoder = "trained" if trained else "nnunet_init" if args.plans else "omitted"
    try:
        spacing = stage_spacing(pd.read_parquet(Path(args.run) / f"{name}_manifest.parquet", columns=["spacing"]))
    except (OSError, ValueError, KeyError):  # a run folder from before stages recorded their manifest
        spacing = (1.0, 1.0, 1.0)
    pretrain_plan = nnssl_pretrain_plan(patch_size=(stages[name]["out_size"],) * 3, spacing=spacing)
    plans = None
    if args.plans is not None:  # checked before the export is written
        source, dataset = load_plans(args.plans)
        plans = plans_for_export(
            source,
            dataset,
            adaptation_plan(net, cfg["model"], pretrain_plan, decoder=decoder),
            plans_name=args.plans_name or f"{source['plans_name']}_{Path(args.output).stem}",
            configuration=args.configuration,
            patch_size=args.patch_size,
        )
    path = export_encoder(net, cfg["model"], args.output, pretrain_plan, decoder=decoder)
    print(f"exported {name} ({objective}) weights of {cfg['model']} to {path}: {_HELD[decoder]}")
    if plans is not None:
        written = write_plans(plans, args.plans.parent)
        print(f"nnU-Net plans {plans['plans_name']!r} written to {written}; fine-tune with\n"
              f"  nnUNetv2_train {plans['dataset_name']} {args.configuration} FOLD -p {plans['plans_name']} "
              f"-pretrained_weights {path}")  # fmt: skip
    return 0

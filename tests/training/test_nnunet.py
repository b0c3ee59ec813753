"""Exports fine-tune in released nnU-Net (2.8.1, the [finetune] extra), checked with nnU-Net's own code.

A tiny raw dataset (nilearn's MNI152 at 6 mm, its grey/white-matter maps as labels, 5 cases) goes through
`nnUNetv2_plan_and_preprocess -pl nnUNetPlannerResEncL`; `openmind-train export --plans` writes the export and a
plans file; nnU-Net builds its network from that plan, loads the export with its `load_pretrained_weights`, and trains
one short epoch with validation on the CPU (tests/training/nnunet_finetune.py: without timm, nnUNetv2_train can only
find its default trainer, so the helper passes nnU-Net's `nnUNetTrainer_1epoch` class directly). Tests that need
nnU-Net skip only where the extra is not installed; ./setup.sh installs it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pydoc
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nilearn import datasets, image

from training.cli import main
from training.model import adaptation_plan, network_from_plan, nnssl_pretrain_plan, resenc_l, resenc_tiny
from training.nnunet_plans import PlansError, plans_for_export

needs_nnunet = pytest.mark.skipif(
    importlib.util.find_spec("nnunetv2") is None, reason="needs the [finetune] extra (./setup.sh installs it)"
)
BIN = Path(sys.executable).parent
HELPER = Path(__file__).with_name("nnunet_finetune.py")
DATASET = "Dataset001_MNI"
LABELS = {"background": 0, "grey_matter": 1, "white_matter": 2}


@dataclass(frozen=True)
class Planned:
    env: dict[str, str]  # the nnUNet_* folders and process count for nnU-Net's subprocesses
    folder: Path  # nnUNet_preprocessed/DATASET
    run: Path  # an openmind-train run folder with a VoCo and an MAE stage of resenc_tiny


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> Planned:
    """The tiny dataset planned and preprocessed by nnU-Net's ResEnc-L planner, and a run folder to export from."""
    root = tmp_path_factory.mktemp("nnunet")
    env = {**os.environ, "nnUNet_def_n_proc": "1"}  # 2 cores: one worker process
    env.update({name: str(root / name) for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    _write_raw_dataset(root / "nnUNet_raw" / DATASET)
    command = [str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", "1", "-pl", "nnUNetPlannerResEncL", "-c", "3d_fullres",
               "-np", "1", "-npfp", "1"]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = root / "run"
    run.mkdir()
    stages = [{"name": name, "objective": name, "out_size": 32} for name in ("voco", "mae")]
    (run / "config.json").write_text(json.dumps({"model": "resenc_tiny", "stages": stages}))
    for seed, stage in enumerate(stages):
        torch.manual_seed(seed)
        torch.save(resenc_tiny().state_dict(), run / f"{stage['name']}_final.pt")
    return Planned(env, root / "nnUNet_preprocessed" / DATASET, run)


def _write_raw_dataset(folder: Path) -> None:
    """5 cases of nnU-Net's raw format at 6 mm (32 x 40 x 32): MNI152 T1 with scaled intensity and noise."""
    affine = np.diag([6.0, 6.0, 6.0, 1.0])
    affine[:3, 3] = [-96, -132, -78]
    volumes = [
        image.resample_img(load(resolution=2), target_affine=affine, target_shape=(32, 40, 32), force_resample=True,
                           copy_header=True).get_fdata()
        for load in (datasets.load_mni152_template, datasets.load_mni152_gm_template, datasets.load_mni152_wm_template)
    ]  # fmt: skip
    t1, grey, white = volumes
    label = np.where(np.maximum(grey, white) > 0.3, np.where(white > grey, 2, 1), 0).astype(np.uint8)
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for case in range(5):
        scan = t1 * rng.uniform(0.8, 1.2) + rng.normal(0, 5, t1.shape)
        nib.save(nib.Nifti1Image(scan.astype(np.float32), affine), folder / "imagesTr" / f"case{case}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), folder / "labelsTr" / f"case{case}.nii.gz")
    dataset = {"channel_names": {"0": "T1"}, "labels": LABELS, "numTraining": 5, "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps(dataset))


def _export(planned: Planned, tmp_path: Path, stage: str, *plans: str) -> Path:
    output = tmp_path / f"{stage}.pt"
    argv = ["export", str(planned.run), "--stage", stage, "-o", str(output), *plans]
    assert main(argv) == 0
    return output


def _with_plans(planned: Planned) -> list[str]:
    return ["--plans", str(planned.folder / "nnUNetResEncUNetLPlans.json"), "--patch-size", "32"]


def _nnunet_network(plans: Path, num_classes: int, deep_supervision: bool = True) -> torch.nn.Module:
    """The network nnU-Net's trainer builds from a plans file (nnUNetTrainer.build_network_architecture)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    config = PlansManager(str(plans)).get_configuration("3d_fullres")
    return get_network_from_plans(config.network_arch_class_name, config.network_arch_init_kwargs,
                                  config.network_arch_init_kwargs_req_import, 1, num_classes,
                                  deep_supervision=deep_supervision)  # fmt: skip


@needs_nnunet
def test_resenc_l_preset_is_nnunets_stock_resenc_l_plan_for_1mm_heads(planned: Planned) -> None:
    """nnUNetPlannerResEncL's own configuration for 1 mm data of the MNI head's size: our preset, exactly."""
    script = (
        "import json, sys\n"
        "from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners "
        "import nnUNetPlannerResEncL\n"
        "config = nnUNetPlannerResEncL(1).get_plans_for_configuration((1.0, 1.0, 1.0), (197, 233, 189), 'x', 1e9, {})\n"
        "json.dump({'patch_size': [int(p) for p in config['patch_size']], **config['architecture']}, sys.stdout, "
        "default=list)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=planned.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    stock = json.loads(done.stdout.strip().splitlines()[-1])
    ours = adaptation_plan(resenc_l(), "resenc_l", nnssl_pretrain_plan((160,) * 3))["architecture_plans"]
    assert pydoc.locate(stock["network_class_name"]) is pydoc.locate(
        "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    )

    def resolved(kwargs: dict, imports: list[str]) -> dict:
        return {k: pydoc.locate(v) if k in imports and v is not None else v for k, v in kwargs.items()}

    assert resolved(stock["arch_kwargs"], stock["_kw_requires_import"]) == resolved(
        ours["arch_kwargs"], ours["arch_kwargs_requiring_import"]
    )
    assert all(p % 32 == 0 for p in stock["patch_size"])  # the stock patch suits the export too (--patch-size)


@needs_nnunet
def test_export_plans_build_the_export_network_and_nnunet_loads_every_key(planned: Planned, tmp_path: Path) -> None:
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    for stage in ("mae", "voco"):
        export = _export(planned, tmp_path, stage, *_with_plans(planned), "--plans-name", f"openmind_{stage}")
        plans = planned.folder / f"openmind_{stage}.json"
        saved = torch.load(export, weights_only=True)
        weights, plan = saved["network_weights"], saved["nnssl_adaptation_plan"]
        net = _nnunet_network(plans, num_classes=len(LABELS))
        ours = network_from_plan(plan, num_classes=len(LABELS)).state_dict()
        assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in ours.items()}
        load_pretrained_weights(net, str(export))
        loaded = net.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in weights.items() if ".seg_layers." not in k)
        assert json.loads(plans.read_text())["configurations"]["3d_fullres"]["patch_size"] == [32, 32, 32]
    assert plan["trained_parts"] == ["encoder"]  # voco: the decoder it carries is nnU-Net's own initialisation
    torch.manual_seed(0)
    reference = _nnunet_network(plans, num_classes=1, deep_supervision=None).state_dict()
    decoder = [k for k in weights if k.startswith("decoder.") and not k.startswith("decoder.encoder.")]
    assert decoder and all(torch.equal(weights[k], reference[k]) for k in decoder)


@needs_nnunet
def test_released_nnunet_refuses_an_encoder_only_export(planned: Planned, tmp_path: Path) -> None:
    """Why --plans fills the decoder: 2.8.1's load_pretrained_weights asserts every key but the seg layers."""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    export = _export(planned, tmp_path, "voco")
    weights = torch.load(export, weights_only=True)["network_weights"]
    assert weights and all(k.startswith("encoder.") for k in weights)
    _export(planned, tmp_path, "mae", *_with_plans(planned), "--plans-name", "openmind_refuse")
    net = _nnunet_network(planned.folder / "openmind_refuse.json", num_classes=len(LABELS))
    with pytest.raises(AssertionError, match=r"Key decoder\..* is missing"):
        load_pretrained_weights(net, str(export))


@pytest.mark.slow
@needs_nnunet
def test_released_nnunet_fine_tunes_an_encoder_only_export(planned: Planned, tmp_path: Path) -> None:
    export = _export(planned, tmp_path, "voco", *_with_plans(planned), "--plans-name", "openmind_finetune")
    command = [sys.executable, str(HELPER), "1", "3d_fullres", "0", "openmind_finetune", str(export), "2"]
    env = {**planned.env, "nnUNet_n_proc_DA": "0"}  # augment in the trainer's process (0 breaks the planner)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"Loading pretrained weights from file  {export}" in done.stdout
    results = Path(planned.env["nnUNet_results"]) / DATASET / "nnUNetTrainer_1epoch__openmind_finetune__3d_fullres"
    summary = json.loads((results / "fold_0" / "validation" / "summary.json").read_text())
    assert set(summary["mean"]) == {"1", "2"}  # both tissue labels scored on the held-out case
    # nnU-Net's own checkpoint, written by this test, holds numpy objects that a weights_only load refuses
    trained = torch.load(results / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    exported = torch.load(export, weights_only=True)["network_weights"]
    assert {k: v.shape for k, v in trained["network_weights"].items() if ".seg_layers." not in k} == {
        k: v.shape for k, v in exported.items() if ".seg_layers." not in k
    }


def test_plans_for_export_refuses_what_nnunet_could_not_load(tmp_path: Path) -> None:
    net = resenc_tiny()
    plan = adaptation_plan(net, "resenc_tiny", nnssl_pretrain_plan((32,) * 3))
    plans = {"plans_name": "P", "dataset_name": "D", "configurations": {"3d_fullres": {"spacing": [1, 1, 1]},
                                                                       "2d": {"spacing": [1, 1]}}}  # fmt: skip
    one = {"channel_names": {"0": "T1"}}
    ok = plans_for_export(plans, one, plan, plans_name="P_x")
    assert ok["configurations"]["3d_fullres"]["patch_size"] == [160, 160, 160]  # the export's recommended patch
    assert plans["configurations"]["3d_fullres"] == {"spacing": [1, 1, 1]}  # the source is left as it was
    for kwargs, match in [
        ({"plans_name": "P"}, "other than the source"),
        ({"plans_name": "P__x"}, "single '_'"),
        ({"plans_name": "P_x", "configuration": "3d_lowres"}, "expected one of"),
        ({"plans_name": "P_x", "configuration": "2d"}, "not 3D"),
        ({"plans_name": "P_x", "patch_size": (32, 36, 32)}, "total stride"),
    ]:
        with pytest.raises(PlansError, match=match):
            plans_for_export(plans, one, plan, **kwargs)
    with pytest.raises(PlansError, match="2 input channels"):
        plans_for_export(plans, {"channel_names": {"0": "T1", "1": "T2"}}, plan, plans_name="P_x")


def test_export_with_a_bad_plans_file_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "resenc_tiny", "stages": [
        {"name": "voco", "objective": "voco", "out_size": 32}]}))  # fmt: skip
    torch.save(resenc_tiny().state_dict(), run / "voco_final.pt")
    (tmp_path / "plans.json").write_text("{}")
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"}}))
    output = tmp_path / "voco.pt"
    assert main(["export", str(run), "-o", str(output), "--plans", str(tmp_path / "plans.json")]) == 2
    assert "not an nnU-Net plans file" in capsys.readouterr().err
    assert not output.exists()

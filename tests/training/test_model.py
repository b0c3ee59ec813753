"""ResEnc presets match nnssl's ResEnc-L; exports round-trip strictly and fail before writing."""

import numpy as np
import pytest
import torch
from torch import nn

from training.embed import load_encoder
from training.model import (
    PRESETS,
    ExportError,
    encoder_features,
    export_encoder,
    load_exported,
    nnssl_pretrain_plan,
    resenc_l,
    resenc_tiny,
)

RESENC_L_FEATURES = (32, 64, 128, 256, 320, 320)
RESENC_L_BLOCKS = (1, 3, 4, 6, 6, 6)
# Closed-form count below for 1 input channel and 1 output class; recorded in notes/training_objectives.md.
RESENC_L_PARAMETERS = 102_348_965


def _resenc_unet_parameter_count(in_channels: int, features, blocks, num_classes: int) -> int:
    """Count from the architecture's description, not from the module: the oracle for the preset."""

    def conv3(cin: int, cout: int) -> int:  # 3^3 conv with bias + affine InstanceNorm
        return cin * cout * 27 + cout + 2 * cout

    total = conv3(in_channels, features[0])  # stem
    cin = features[0]
    for cout, n in zip(features, blocks, strict=True):
        total += conv3(cin, cout) + conv3(cout, cout)  # first block: conv1 takes cin (and the stride)
        total += (n - 1) * 2 * conv3(cout, cout)  # remaining blocks: two convs each
        if cin != cout:
            total += cin * cout + 2 * cout  # ResNet-D skip: 1x1 conv without bias + norm
        cin = cout
    for below, skip in zip(features[:0:-1], features[-2::-1], strict=True):
        total += below * skip * 8 + skip  # 2^3 transposed conv with bias
        total += conv3(2 * skip, skip)  # one conv per decoder stage
        total += skip * num_classes + num_classes  # 1x1 seg layer (one per stage, as DNA builds them)
    return total


def test_resenc_l_has_nnssl_topology_and_parameter_count():
    net = resenc_l()
    stages = net.encoder.stages
    assert [len(stage.blocks) for stage in stages] == list(RESENC_L_BLOCKS)
    assert [stage.blocks[0].conv1.conv.out_channels for stage in stages] == list(RESENC_L_FEATURES)
    assert [stage.blocks[0].conv1.conv.stride for stage in stages] == [(1, 1, 1)] + [(2, 2, 2)] * 5
    assert len(net.decoder.stages) == 5 and all(len(s.convs) == 1 for s in net.decoder.stages)
    norms = [m for m in net.modules() if isinstance(m, nn.InstanceNorm3d)]
    assert norms and all(m.eps == 1e-5 and m.affine for m in norms)
    assert all(m.inplace for m in net.modules() if isinstance(m, nn.LeakyReLU))
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d) and m.kernel_size == (3, 3, 3)]
    assert all(m.bias is not None for m in convs)

    expected = _resenc_unet_parameter_count(1, RESENC_L_FEATURES, RESENC_L_BLOCKS, 1)
    assert expected == RESENC_L_PARAMETERS
    assert sum(p.numel() for p in net.parameters()) == expected


def test_tiny_preset_forward_shapes():
    torch.manual_seed(0)
    net = PRESETS["resenc_tiny"](num_classes=2)
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        assert net(x).shape == (2, 2, 32, 32, 32)
        assert encoder_features(net.encoder, x).shape == (2, net.encoder.output_channels[-1], 4, 4, 4)


def test_export_round_trip_is_strict_and_identical(tmp_path):
    torch.manual_seed(0)
    net = resenc_tiny()
    path = tmp_path / "out" / "checkpoint_final.pth"
    export_encoder(net, "resenc_tiny", path, nnssl_pretrain_plan((32, 32, 32)))

    loaded, plan = load_exported(path)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)
    assert plan["key_to_encoder"] == "encoder.stages"
    assert plan["key_to_stem"] == "encoder.stem"
    assert plan["keys_to_in_proj"] == ["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"]
    assert plan["key_to_lpe"] is None
    assert plan["recommended_downstream_patchsize"] == [160, 160, 160]
    assert plan["pretrain_num_input_channels"] == 1
    arch = plan["architecture_plans"]
    assert arch["arch_class_name"] == "ResidualEncoderUNet"
    assert arch["arch_kwargs"]["conv_op"] == "torch.nn.modules.conv.Conv3d"
    assert arch["arch_kwargs"]["features_per_stage"] == [4, 8, 16, 32]
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    parameter_bytes = 4 * sum(p.numel() for p in net.parameters())
    assert path.stat().st_size < 1.2 * parameter_bytes  # shared tensors (conv / all_modules.0) stored once


def test_export_of_mismatching_weights_writes_nothing(tmp_path):
    net = resenc_tiny()
    path = tmp_path / "checkpoint_final.pth"
    with pytest.raises(ExportError, match="resenc_l"):
        export_encoder(net, "resenc_l", path, nnssl_pretrain_plan((32, 32, 32)))
    assert list(tmp_path.iterdir()) == []


def test_export_rejects_a_pretrain_plan_nnssl_cannot_rebuild(tmp_path):
    plan = nnssl_pretrain_plan((32, 32, 32))
    del plan["configurations"]["onemmiso"]["patch_size"]
    with pytest.raises(ExportError, match="patch_size"):
        export_encoder(resenc_tiny(), "resenc_tiny", tmp_path / "x.pth", plan)
    assert list(tmp_path.iterdir()) == []


def test_export_rejects_a_pretrain_plan_that_needs_unpickling(tmp_path):
    plan = nnssl_pretrain_plan((32, 32, 32))
    plan["configurations"]["onemmiso"]["patch_size"] = list(np.array([32, 32, 32]))  # numpy scalars
    with pytest.raises(ExportError, match="would not load"):
        export_encoder(resenc_tiny(), "resenc_tiny", tmp_path / "x.pth", plan)
    assert list(tmp_path.iterdir()) == []


def _export(tmp_path, net, decoder: str):
    plan = nnssl_pretrain_plan((32,) * 3)
    return export_encoder(net, "resenc_tiny", tmp_path / f"{decoder}.pt", plan, decoder=decoder)


def test_an_encoder_only_export_holds_the_encoder_alone_and_loads_with_a_fresh_decoder(tmp_path):
    torch.manual_seed(0)
    net = resenc_tiny()
    path = _export(tmp_path, net, "omitted")
    saved = torch.load(path, weights_only=True)
    assert saved["nnssl_adaptation_plan"]["trained_parts"] == ["encoder"]
    assert saved["network_weights"].keys() == {f"encoder.{k}" for k in net.encoder.state_dict()}
    assert path.stat().st_size < 1.2 * 4 * sum(p.numel() for p in net.encoder.parameters())

    loaded, _ = load_exported(path)  # what openmind-eval probe loads: the encoder as trained, a fresh decoder
    for key, value in net.encoder.state_dict().items():
        assert torch.equal(loaded.encoder.state_dict()[key], value)
    assert not torch.equal(loaded.decoder.stages[0].convs[0].conv.weight, net.decoder.stages[0].convs[0].conv.weight)
    probe = load_encoder(path)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        for got, want in zip(probe.net.encoder(x), net.encoder(x), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_trained_decoder_is_exported_and_an_nnunet_init_one_replaces_the_untrained_one(tmp_path):
    torch.manual_seed(0)
    net = resenc_tiny()
    trained = torch.load(_export(tmp_path, net, "trained"), weights_only=True)
    assert trained["nnssl_adaptation_plan"]["trained_parts"] == ["encoder", "decoder"]
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in trained["network_weights"].items())
    assert trained["network_weights"].keys() == net.state_dict().keys()

    filled_path = _export(tmp_path, net, "nnunet_init")
    filled = torch.load(filled_path, weights_only=True)
    assert filled["nnssl_adaptation_plan"]["trained_parts"] == ["encoder"]
    weights = filled["network_weights"]
    assert weights.keys() == net.state_dict().keys()  # every key, as released nnU-Net's loader requires
    assert all(torch.equal(v, weights[f"encoder.{k}"]) for k, v in net.encoder.state_dict().items())
    convs = [m for m in net.decoder.stages.modules() if isinstance(m, nn.Conv3d)]
    assert convs and all(m.bias.abs().sum() > 0 for m in convs)  # PyTorch's default init: biases drawn
    biases = [v for k, v in weights.items() if k.startswith("decoder.stages.") and k.endswith("conv.bias")]
    assert biases and all(not v.any() for v in biases)  # nnU-Net's InitWeights_He: biases zero
    assert load_encoder(filled_path).net.encoder.state_dict().keys() == net.encoder.state_dict().keys()


def test_export_rejects_an_unknown_decoder_choice(tmp_path):
    with pytest.raises(ExportError, match="decoder"):
        _export(tmp_path, resenc_tiny(), "random")
    assert list(tmp_path.iterdir()) == []

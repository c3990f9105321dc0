"""Analysis: shapes, FLOPs, params, measured resolution levels, saved bytes."""

import pytest
import timm
import torch
import torchvision
from timm.models.swin_transformer import SwinTransformer

import fxrelay
from fxrelay.passes.analysis import _saved_bytes, _snap, analyse
from fxrelay.passes.tracing import as_inputs

X64 = torch.randn(1, 3, 64, 64)


@pytest.fixture(scope="module")
def resnet18():
    gm = fxrelay.trace(torchvision.models.resnet18())
    return gm, analyse(gm, X64)


def test_shapes_flops_params_and_levels_of_resnet18(resnet18):
    gm, a = resnet18
    conv1 = a.info["conv1"]
    assert conv1.shape == (2, 64, 32, 32) and a.batch == 2 and a.exact_levels
    assert conv1.flops == 2 * 64 * 3 * 7 * 7 * 32 * 32  # reason: 2 FLOPs per multiply-accumulate
    assert conv1.params == 64 * 3 * 7 * 7
    assert a.info["fc"].flops == 2 * 512 * 1000 and a.info["fc"].params == 512 * 1000 + 1000
    assert a.info["bn1"].flops == 0 and a.info["add"].flops == 0
    assert (a.info["layer2_0_conv1"].reduction, a.info["fc"].reduction, a.info["fc"].level) == (8, None, 32)
    assert [a.info[n].reduction for n in ("relu", "maxpool", "layer2_1_relu_1", "layer4_1_relu_1")] == [2, 4, 8, 32]
    assert gm.graph.find_nodes(op="call_module", target="fc")[0].meta["fxrelay"] is a.info["fc"]
    assert sum(i.params for i in a.info.values()) == sum(p.numel() for p in gm.parameters())


def test_nhwc_levels_without_pooling_ops_swin():
    model = SwinTransformer(img_size=64, window_size=4, embed_dim=16, depths=(1, 1, 1), num_heads=(1, 1, 1))
    gm = fxrelay.trace(model.eval())
    a = analyse(gm, X64)
    assert a.info["patch_embed_norm"].shape == (2, 16, 16, 16)  # reason: NHWC
    levels = sorted({i.reduction for i in a.info.values() if i.reduction is not None})
    assert levels == [1, 4, 8, 16]  # reason: 1 is the input; 6-d window reshapes have none
    assert a.info["head_fc"].reduction is None and a.info["head_fc"].level == 16


@pytest.mark.parametrize("dynamic", [True, False], ids=["two-sizes", "one-size"])
def test_token_levels_with_a_class_token_vit(dynamic):
    model = timm.create_model("test_vit", img_size=64, dynamic_img_size=dynamic).eval()
    gm = fxrelay.trace(model)
    a = analyse(gm, X64)
    assert a.exact_levels is dynamic  # reason: a fixed-size ViT only runs at one size
    blocks_out = [n.name for n in gm.graph.nodes if n.name.startswith("blocks_")][-1]
    assert a.info[blocks_out].shape[1] == (64 // 16) ** 2 + 1 and a.info[blocks_out].reduction == 16


def test_snap_rounds_to_the_stride_convention():
    assert _snap(224, 7) == 32 and _snap(299, 149) == 2 and _snap(224, 16) == 14
    assert _snap(299, 17 - 8) == 32  # reason: growth of a valid-conv map, 299 -> 8 and 598 -> 17
    assert _snap(224, 7 - 4) == 64  # reason: selecsls' stride-2 head, 224 -> 4 and 448 -> 7
    assert _snap(224, 32) == 7  # reason: convmixer's patch 7 is not a power of two


def test_as_inputs():
    x = torch.zeros(1)
    assert as_inputs(x) == (x,) and as_inputs([x, x]) == (x, x)


class _Recurrent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(8, 16, batch_first=True)
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.lstm(x)[0])


def test_recurrent_layer_runs_one_step_with_the_figures_of_all_steps():
    """On meta tensors an LSTM runs one time step (every step is a Python decomposition there); its
    output shape, FLOPs and saved bytes equal the full run's."""
    gm = fxrelay.trace(_Recurrent())
    x = torch.randn(1, 12, 8)
    a = analyse(gm, x, memory=True)
    full = _saved_bytes(gm, (x,), a.batch)  # reason: the pass of its own, every step run
    assert a.info["lstm"].shape == (2, 12, 16) and a.info["fc"].shape == (2, 12, 4)
    assert {k: v.saved_bytes for k, v in a.info.items() if v.saved_bytes} == full.bytes
    assert a.info["lstm"].flops == 2 * 12 * (4 * 16) * (8 + 16)  # reason: 4 gates x (input + hidden) per step

"""The demo pipeline on a tiny budget: both modes train, the deployed model matches the trained one."""

import torch

import fxrelay
from fxrelay.apps.cli import main
from fxrelay.apps.demo import TOLERANCE, DeployCheck, check_deployed, run_demo


def test_demo_trains_renders_deploys_saves(tmp_path, capsys):
    result = run_demo(tmp_path, epochs=1, train_size=256, val_size=128)
    assert [row[0] for row in result.rows] == ["standard", "relay"]
    assert [row[3] for row in result.rows] == [1, 3]
    # one relay step per memory execution: the same gradients, less memory than the one-line step
    one_line, recompute, local = result.memory
    assert [row.execution for row in result.memory] == ["one-line", "recompute", "local"]
    assert 0 < local.saved_mb < one_line.saved_mb and local.allocated_mb < one_line.allocated_mb
    assert recompute.allocated_mb < one_line.allocated_mb
    assert max(recompute.grad_diff, local.grad_diff) < 1e-5
    assert result.check.passed and result.check.max_diff < 1e-4 and result.check.precision == "float32"
    assert result.deployed_accuracy == result.rows[-1][1]
    assert result.batchnorms[0] > 0 and result.batchnorms[1] == 0
    assert all(f.exists() and f.stat().st_size > 0 for f in result.files)
    text = str(result)
    assert "relay" in text and "files written" in text
    assert f"deployed computes what the trained model does: PASS: max |deployed - trained| = " in text
    assert f"({TOLERANCE:.0e} x max(1, max |output|))" in text
    captured = capsys.readouterr()
    # the plan of runs comes first; each run's bar is labelled and stays (its final 100% state is printed)
    assert captured.out.splitlines()[1:3] == ["  run 1/2: standard (plain backprop)", "  run 2/2: relay (Relay BP)"]
    assert "run 1/2 standard: 100%" in captured.err and "run 2/2 relay   : 100%" in captured.err
    # both saved models load without unsafe unpickling, and compute what was trained
    files = {f.suffix: f for f in result.files}
    assert f"{files['.pt2']}  deployed model: fxrelay.load(path)" in text
    assert torch.load(files[".pt"], weights_only=True)["format"] == "fxrelay.trained/1"
    x = torch.randn(3, 3, 32, 32)
    deployed = fxrelay.load(files[".pt2"])
    assert torch.equal(deployed(x), torch.export.load(files[".pt2"]).module()(x))
    assert (deployed(x) - fxrelay.load(files[".pt"]).eval()(x)).abs().max().item() < 1e-4


def test_a_deployed_model_that_differs_fails_the_check():
    model = fxrelay.transform(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                                  torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                                  torch.nn.Linear(4, 2)), "standard").eval()
    deployed = fxrelay.deploy(model)
    with torch.no_grad():
        deployed.get_parameter(next(n for n, _ in deployed.named_parameters() if n.endswith("bias"))).add_(1e-2)
    check = check_deployed(model, deployed, [(torch.randn(4, 3, 8, 8), None)])
    assert not check.passed and check.precision == "float64" and check.max_diff > 1e-3
    assert str(check).startswith("FAIL: max |deployed - trained| = ") and " in float64 (float32 rounding: " in str(check)
    assert str(DeployCheck(2e-5, 1e-4)).startswith("PASS: max |deployed - trained| = 2.00e-05 <= 1.00e-04")


def test_cli_render_writes_svg_titled_with_the_given_name(tmp_path, capsys):
    out = tmp_path / "r18.svg"
    assert main(["render", "tv:resnet18", "--input-size", "64", "--mode", "greedy", "-o", str(out)]) == 0
    text = out.read_text()
    assert text.count("<title>cluster_stage_") == 5 and "loss 4 (head at stage 4, main, w=1) trains stage 4" in text
    assert ">tv:resnet18</text>" in text and ">ResNet</text>" not in text

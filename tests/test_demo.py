"""The demo pipeline on a tiny budget: both modes train, the deployed model matches the trained one."""

from fxrelay.apps.cli import main
from fxrelay.apps.demo import run_demo


def test_demo_trains_renders_deploys(tmp_path):
    result = run_demo(tmp_path, epochs=1, train_size=256, val_size=128, progress=False)
    assert [row[0] for row in result.rows] == ["standard", "relay"]
    assert [row[3] for row in result.rows] == [1, 3]
    assert result.deployed_max_diff < 1e-4
    assert result.deployed_accuracy == result.rows[-1][1]
    assert result.batchnorms[0] > 0 and result.batchnorms[1] == 0
    assert all(f.exists() and f.stat().st_size > 0 for f in result.files)
    assert "relay" in str(result) and "files written" in str(result)


def test_cli_render_writes_svg(tmp_path, capsys):
    out = tmp_path / "r18.svg"
    assert main(["render", "tv:resnet18", "--input-size", "64", "--mode", "greedy", "-o", str(out)]) == 0
    text = out.read_text()
    assert text.count("<title>cluster_stage_") == 5 and "loss 4 (head at stage 4, main, w=1) trains stage 4" in text

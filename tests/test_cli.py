"""The ``fxrelay`` command line."""

import pytest

from fxrelay.apps.cli import COMMANDS, build_parser, main


def test_inspect_prints_the_plan_of_a_torchvision_model(capsys):
    assert main(["inspect", "tv:resnet18", "--input-size", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Plan of ResNet: 5 stages (boundaries=pool, mode=standard), 11.69M params, 0.297 GFLOPs/sample"
    assert [line.split()[2] for line in lines[2:]] == ["2", "4", "8", "16", "32"]


def test_inspect_a_timm_model_with_blocks_and_num_stages(capsys):
    assert main(["inspect", "test_resnet", "--boundaries", "blocks", "--num-stages", "3", "--input-size", "64"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Plan of ResNet: 3 stages (boundaries=blocks, mode=standard)")
    assert len(out.splitlines()) == 2 + 3


def test_inspect_a_fixed_size_timm_model_at_another_size(capsys):
    assert main(["inspect", "test_vit", "--input-size", "64"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "boundaries=blocks" in out[0] and {line.split()[2] for line in out[2:]} == {"16"}


@pytest.mark.parametrize("name, suggestion", [("resnet5", "resnet50"), ("tv:resnet5", "tv:resnet50")])
def test_unknown_model_is_one_line_with_close_matches(capsys, name, suggestion):
    assert main(["inspect", name]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.err.startswith(f"fxrelay inspect: error: unknown model {name!r}; did you mean ")
    assert suggestion in captured.err.split("did you mean ")[1].rstrip("?\n").split(", ")


def test_impossible_num_stages_is_a_usage_error(capsys):
    assert main(["inspect", "tv:resnet18", "--num-stages", "999", "--input-size", "64"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "num_stages must be between 1 and" in err and "got 999" in err


def test_bad_arguments_exit_2_through_argparse(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["inspect", "tv:resnet18", "--boundaries", "pools"])
    assert exit_.value.code == 2 and "invalid choice: 'pools'" in capsys.readouterr().err


def test_every_command_is_a_subparser():
    parser = build_parser()
    assert COMMANDS[0].name == "inspect"
    assert parser.parse_args(["inspect", "x"]).run is COMMANDS[0].run
    help_text = parser.format_help()
    assert all(f"    {c.name} " in help_text for c in COMMANDS)

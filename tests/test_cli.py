"""The ``fxrelay`` command line and the example scripts' options.

Error paths run the command in a subprocess, as a user would: the exit code, a single
line on stderr and no traceback are what is checked.
"""

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fxrelay.apps.cli as cli
from fxrelay.apps.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, module: str = "fxrelay", cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python -m fxrelay ARGS`` (or a script) from the repository root: this checkout's package."""
    command = [sys.executable, "-m", module, *args] if module else [sys.executable, *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, start: str) -> str:
    assert result.returncode == code, result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(start), result.stderr
    return result.stderr


def test_inspect_prints_the_plan_of_a_torchvision_model(capsys):
    assert main(["inspect", "tv:resnet18", "--input-size", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Plan of ResNet: 5 stages (boundaries=pool, mode=standard), 11.69M params, 0.297 GFLOPs/sample"
    assert [line.split()[2] for line in lines[2:]] == ["2", "4", "8", "16", "32"]


def test_inspect_mode_shows_heads_and_windows(capsys):
    assert main(["inspect", "tv:resnet18", "--input-size", "64", "--mode", "relay", "--window", "3"]) == 0
    out = capsys.readouterr().out
    assert "mode=relay" in out.splitlines()[0]
    heads = out.split("head  stage  trains")[1].splitlines()[1:4]
    assert [line.split()[:5] for line in heads] == [["0", "2", "0..2", "1", "auto"], ["1", "3", "1..3", "1", "auto"],
                                                    ["2", "4", "2..4", "1", "main"]]


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


def test_every_command_is_a_subparser():
    parser = build_parser()
    assert COMMANDS[0].name == "inspect"
    assert parser.parse_args(["inspect", "x"]).run is COMMANDS[0].run
    help_text = parser.format_help()
    assert all(f"    {c.name} " in help_text for c in COMMANDS)


# --- one-line errors (issue 15, item 6) -------------------------------------------------------------


@pytest.mark.parametrize("args, start, fragment", [
    (["render", "tv:resnet18", "--depth", "abc"], "fxrelay render: error: argument --depth: ",
     "expected a whole number >= 1 or 'none', got 'abc' (see fxrelay render --help)"),
    (["inspect", "tv:resnet18", "--num-stages", "0"], "fxrelay inspect: error: argument --num-stages: ",
     "got 0"),
    (["inspect", "tv:resnet18", "--boundaries", "pools"], "fxrelay inspect: error: argument --boundaries: ",
     "invalid choice: 'pools'"),
    # reason: a bad format is reported before the model is even looked up (no seconds of tracing)
    (["render", "no_such_model", "-o", "x.jpg"], "fxrelay render: error: cannot tell the format of 'x.jpg'",
     "use one of .svg, .png, .pdf, .dot, .gv"),
])
def test_bad_arguments_are_one_line_exit_2(args, start, fragment):
    assert fragment in assert_one_line_error(run(*args), 2, start)


def test_demo_with_an_unknown_model_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    err = assert_one_line_error(run("demo", "--model", "resnet_10t", "--out", str(out)), 2,
                                "fxrelay demo: error: unknown model 'resnet_10t'; did you mean resnet10t")
    assert err.endswith("?\n") and not out.exists()


def test_a_model_that_rejects_the_input_size_is_one_line(tmp_path):
    # reason: inspect and render share the code that traces the model (cli._transformed)
    err = assert_one_line_error(run("render", "tv:vit_b_16", "--input-size", "64", "-o", str(tmp_path / "x.dot")), 2,
                                "fxrelay render: error: ")
    assert "64" in err and not (tmp_path / "x.dot").exists()


def test_render_creates_the_output_folder(tmp_path):
    path = tmp_path / "nodir" / "sub" / "r18.dot"
    result = run("render", "tv:resnet18", "--input-size", "64", "-o", str(path))
    assert result.returncode == 0 and result.stdout == f"{path}\n" and path.read_text().startswith("digraph")


def test_an_unexpected_error_is_one_line_exit_1(monkeypatch, capsys):
    def broken(args):
        raise KeyError("stage_7")

    monkeypatch.setattr(cli, "_transformed", broken)
    assert main(["inspect", "tv:resnet18"]) == 1
    captured = capsys.readouterr()
    assert captured.err == ("fxrelay inspect: error: KeyError: 'stage_7' "
                            "(fxrelay --traceback inspect ... shows where)\n")
    with pytest.raises(KeyError):
        main(["--traceback", "inspect", "tv:resnet18"])


# --- discoverability (item 8) and start-up (item 9) --------------------------------------------------


def test_version():
    from importlib.metadata import version

    result = run("--version")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout == (f"fxrelay {cli.__version__} (torch {version('torch')}, torchvision "
                             f"{version('torchvision')}, timm {version('timm')}; python {sys.version.split()[0]})\n")


def test_help_imports_no_torch():
    result = run("-X", "importtime", "-m", "fxrelay", "--help", module="")
    assert result.returncode == 0 and "inspect" in result.stdout
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert {"fxrelay", "fxrelay.io.zoo"} <= imported
    assert not {"torch", "timm", "torchvision", "fxrelay.passes.rewrite", "fxrelay.diagrams.render"} & imported


def test_lazy_package_keeps_every_public_name():
    import fxrelay

    # reason: importing the modules that define them must not hide the public functions
    code = ("import sys, fxrelay; assert 'torch' not in sys.modules; "
            "import fxrelay.deployment.deploy, fxrelay.diagrams.render, fxrelay.passes.partition, fxrelay.data; "
            f"from fxrelay import {', '.join(fxrelay.__all__)}; "
            "assert all(callable(f) for f in (fxrelay.deploy, fxrelay.render, fxrelay.partition, fxrelay.trace)); "
            "assert callable(fxrelay.data.Digits if hasattr(fxrelay.data, 'Digits') else fxrelay.data.Shapes); "
            "print(sorted(dir(fxrelay)) == dir(fxrelay))")
    result = run("-c", code, module="")
    assert result.returncode == 0 and result.stdout == "True\n", result.stderr


# --- the example scripts' options (item 8) -------------------------------------------------------------

SCRIPTS = [ROOT / "examples" / "zoo_sweep.py", *sorted((ROOT / "examples" / "bench").glob("*.py"))]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_script_option_has_help_and_states_its_default(script):
    calls = [node for node in ast.walk(ast.parse(script.read_text())) if isinstance(node, ast.Call)
             and getattr(node.func, "attr", "") == "add_argument"]
    for call in calls:
        keywords = {k.arg: k.value for k in call.keywords}
        name = ast.literal_eval(call.args[0])
        assert "help" in keywords, f"{script.name} {name}: no help"
        if getattr(keywords["help"], "attr", "") == "SUPPRESS":
            continue  # reason: an internal option, hidden from --help
        if "default" in keywords:
            text = "".join(ast.literal_eval(part) if isinstance(part, ast.Constant) else ""
                           for part in getattr(keywords["help"], "values", [keywords["help"]]))
            assert "default" in text, f"{script.name} {name}: the help does not state the default"


def zoo_sweep(monkeypatch):
    spec = importlib.util.spec_from_file_location("zoo_sweep", ROOT / "examples" / "zoo_sweep.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "zoo_sweep", module)  # reason: its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def test_zoo_sweep_families_take_aliases_and_model_names(monkeypatch):
    assert zoo_sweep(monkeypatch).resolve_families("resnet,vit,tv:vgg, tv:vit,convnext_atto,tv:resnet18") == {
        "resnet", "vision_transformer", "tv:vgg", "tv:vision_transformer", "convnext", "tv:resnet"}


def test_zoo_sweep_unknown_family_is_one_line_exit_2(tmp_path):
    out = tmp_path / "zoo.csv"
    result = run(str(ROOT / "examples" / "zoo_sweep.py"), "--families", "resnet,vitt", "--out", str(out), module="")
    err = assert_one_line_error(result, 2, "zoo_sweep.py: error: unknown family 'vitt'; did you mean ")
    assert "vit" in re.split(r"[ ,?]+", err) and not out.exists()


def test_ci_runs_the_readme_test_command():
    blocks = re.findall(r"```sh\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    demo, tests = (next(b for b in blocks if b.endswith(end)) for end in (" fxrelay demo", " python -m pytest -q"))
    assert (ROOT / ".ci" / "run").read_text().splitlines()[-1] == tests
    assert demo.removesuffix("fxrelay demo") == tests.removesuffix("python -m pytest -q")
    assert "python3 -m venv" in tests and ". .venv/bin/activate" in tests  # reason: PEP 668 (Debian 12/13)


def test_inspect_memory_and_tracing_flags():
    result = run("inspect", "tv:resnet18", "--input-size", "64", "--mode", "greedy", "--memory", "16",
                 "--leaf-module", "torchvision.models.resnet.BasicBlock")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[3].split()[7] == "3"  # reason: the layer1 stage is the pool and its two blocks, each one node
    memory = lines[lines.index("expected peak of bytes saved for backward, batch 16 (greedy):") + 1:]
    assert [line.split()[0] for line in memory] == ["one-line", "recompute", "local", "sequential"]
    bad = run("inspect", "tv:resnet18", "--autowrap", "nowhere.helper")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "fxrelay inspect: error: cannot import 'nowhere.helper' (No module named 'nowhere'): give "
        "PACKAGE.MODULE.NAME"]

"""examples/evidence.py --quick (the study's smoke test) and compare.py's digits options."""

import csv
import importlib.util
import os
import pathlib
import statistics
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODES = ("standard", "deep", "relay-w1", "relay-w2", "relay-w3", "greedy")


def _compare():
    spec = importlib.util.spec_from_file_location("compare", ROOT / "examples" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_evidence_quick_runs_every_part_and_its_tables_are_the_runs_numbers(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "evidence.py"), "--quick", "--jobs", "2",
                             "--out", str(tmp_path)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    docs = tmp_path / "img"
    for name in ("evidence/results.md", "evidence/depth.png", "evidence/class_aware.png",
                 "compare/digits_plainnet10.png"):
        assert (docs / name).stat().st_size > 0, name
    depth = {r["mode"]: r for r in _rows(docs / "evidence" / "depth.csv")}
    assert list(depth) == list(MODES) and {r["model"] for r in depth.values()} == {"plainnet10"}
    for mode in MODES:
        run = tmp_path / "depth" / "plainnet10" / mode / "seed0"
        main = [float(r["val_accuracy"]) for r in _rows(run / "metrics.csv") if r["main"] == "1"]
        assert len(main) == 1 and float(depth[mode]["final_mean"]) == pytest.approx(main[0], abs=5e-5)
        classes = _rows(run / "classes.csv")
        # reason: the validation split is balanced, so the loop's accuracy is the mean per-class accuracy
        assert statistics.fmean(float(r["val_accuracy"]) for r in classes) == pytest.approx(main[0], abs=1e-6)
        assert [int(r["val_images"]) for r in classes] == [35] * 10
    aware = {(r["mode"], r["sampler"], r["shift"]): r for r in _rows(docs / "evidence" / "class_aware.csv")}
    assert set(aware) == {(m, s, shift) for m in ("standard", "relay-w2") for s in ("shuffle", "class-aware")
                          for shift in ("0", "4")}
    for (mode, sampler, shift), row in aware.items():
        folder = sampler + ("-shift4" if shift == "4" else "")
        classes = _rows(tmp_path / "longtail" / folder / mode / "seed0" / "classes.csv")
        assert [int(r["train_images"]) for r in classes] == [139, 108, 83, 65, 50, 39, 30, 23, 18, 14]
        tail = statistics.fmean(float(r["val_accuracy"]) for r in classes[7:])
        assert float(row["tail_mean"]) == pytest.approx(tail, abs=5e-5)
    text = (docs / "evidence" / "results.md").read_text()
    assert "| plainnet10 |" in text and "| relay-w2 | class-aware | 4 |" in text and "min wall" in text


@pytest.mark.parametrize("modes, message", [
    ("deep-w2", "unknown mode 'deep-w2'"), ("relay-w0", "unknown mode 'relay-w0'"), (",", "none given")])
def test_compare_modes_are_checked_in_one_line(modes, message, capsys):
    with pytest.raises(SystemExit) as info:
        _compare().main(["--modes", modes])
    assert info.value.code == 2
    assert f"error: --modes: {message}" in capsys.readouterr().err


def test_compare_parse_mode():
    parse = _compare().parse_mode
    assert [parse(m) for m in ("relay", "relay-w3", "deep", "greedy")] == [
        ("relay", 2), ("relay", 3), ("deep", 2), ("greedy", 2)]

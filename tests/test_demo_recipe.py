"""recipes/demo.py --quick: binary feedback + KTO must raise held-out accuracy; reversed labels must lower it.

Sampling is seeded, so an adapter that changed nothing would reproduce the "before" samples exactly:
any difference comes from training. The margins are far outside what a no-op or sign-flipped trainer
could produce (measured on this CPU with kto_lite's seeded sampler, 2026-11-30: 0.490 -> 0.640, and
reversed 0.490 -> 0.092). The recipe runs one round of kto_lite.feedback.loop; tests/test_loop.py covers rounds.
"""

import importlib.util
from pathlib import Path

import pytest

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "demo.py"


def run_demo(tmp_path, *extra):
    spec = importlib.util.spec_from_file_location("demo_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(["--quick", "--seed", "0", "--output-dir", str(tmp_path / "demo"), *extra])


@pytest.mark.slow
def test_kto_on_judged_samples_raises_heldout_accuracy(tmp_path, capsys):
    before, after = run_demo(tmp_path)
    assert 0.3 <= before <= 0.7  # the demo model is right only part of the time
    assert after >= before + 0.08, (before, after)
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"accuracy before {before:.3f} after {after:.3f}"


@pytest.mark.slow
def test_reversed_labels_lower_accuracy(tmp_path):
    before, after = run_demo(tmp_path, "--reverse-labels")
    assert after <= before - 0.08, (before, after)


def test_refuses_a_non_empty_output_dir(tmp_path):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit):
        run_demo(tmp_path)
    assert (tmp_path / "demo" / "keep.txt").read_text() == "mine"

"""kto_lite installed as a package: the wheel holds the library, the app and the demo, and its commands
work from any folder without the source tree.

The wheel is built from a copy of the sources with the setuptools already installed (no build isolation:
nothing is downloaded) and installed without dependencies into a fresh venv that sees this environment's
packages (torch and the rest). Every command runs from a folder outside the repository with PYTHONPATH
cleared, and the tests check that what ran is the venv's copy, not the checkout's.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "requirements.txt", "README.md", "kto_lite", "ui")  # what the build reads
DEMO_FILES = ("kto_lite/demo/model/model.safetensors", "kto_lite/demo/model/config.json",
              "kto_lite/demo/model/tokenizer.json", "kto_lite/demo/data/demo_kto.jsonl")


def requirements(path: Path) -> set[str]:
    """The requirement lines of a pip requirements file, normalised; `-r other.txt` lines left out."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return {str(Requirement(line)) for line in lines if line and not line.startswith("-")}


def test_dev_extra_is_requirements_dev_txt():
    """pyproject's `dev` extra and requirements-dev.txt (which README installs from) list the same packages."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {str(Requirement(r)) for r in extras["dev"]} == requirements(ROOT / "requirements-dev.txt")


# ---------------------------------------------------------------------- the wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """kto_lite-*.whl, built from a copy (a build writes build/ and *.egg-info next to the sources)."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(ROOT / name, src / name)
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "--quiet", "-w", str(dist), str(src)], check=True, timeout=300)
    [built] = dist.glob("kto_lite-*.whl")
    return built


@pytest.mark.slow
def test_wheel_holds_both_packages_the_demo_and_the_requirements(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        [metadata] = [n for n in names if n.endswith(".dist-info/METADATA")]
        [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        requires = {line.split(": ", 1)[1] for line in z.read(metadata).decode().splitlines()
                    if line.startswith("Requires-Dist: ") and "extra ==" not in line}
        scripts = z.read(entry_points).decode()
    assert {"kto_lite/__init__.py", "kto_lite/commands/__init__.py", "ui/__main__.py"} <= names
    assert set(DEMO_FILES) <= names
    assert not any(n.startswith(("tests/", "recipes/", "benchmarks/")) for n in names)
    assert {str(Requirement(r)) for r in requires} == requirements(ROOT / "requirements.txt")
    assert "kto-lite = kto_lite.commands:main" in scripts and "kto-lite-app = ui.__main__:main" in scripts


# ---------------------------------------------------------------------- installed in a venv


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (no dependencies: they come from this environment)."""
    path = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(path)],
                   check=True, timeout=120)
    if sys.prefix != sys.base_prefix:  # run from a venv: --system-site-packages reaches only the base Python
        purelib = Path(sysconfig.get_path("purelib", vars={"base": str(path), "platbase": str(path)}))
        (purelib / "outer_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    # --ignore-installed: a kto_lite the outer environment may hold must not count as "already satisfied"
    subprocess.run([path / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed",
                    "--quiet", str(wheel)], check=True, timeout=300, cwd=path)
    return path


def run(venv: Path, program: str, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """`program` from the venv's bin/, in `cwd` (outside the repository), with PYTHONPATH cleared."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run([str(venv / "bin" / program), *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def inside(path: str | Path, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


@pytest.mark.slow
def test_the_venv_imports_the_wheel_not_the_checkout(venv, tmp_path):
    code = ("import json, kto_lite, ui, kto_lite.demo as d; "
            "print(json.dumps([kto_lite.__file__, ui.__file__, str(d.DEMO_MODEL_DIR)]))")
    files = json.loads(run(venv, "python", "-c", code, cwd=tmp_path).stdout)
    assert all(inside(f, venv) for f in files), files


@pytest.mark.slow
def test_kto_lite_help_from_any_folder(venv, tmp_path):
    assert "train [CONFIG.yaml]" in run(venv, "kto-lite", "--help", cwd=tmp_path).stdout


@pytest.mark.slow
def test_kto_lite_trains_on_the_installed_demo(venv, tmp_path):
    """`kto-lite train` with no model or data: the demo model and sample feedback shipped in the wheel."""
    run(venv, "kto-lite", "train", "--max_steps", "1", "--output_dir", "run", cwd=tmp_path, timeout=600)
    run_dir = tmp_path / "run"
    assert (run_dir / "adapter_model.safetensors").is_file()
    base = json.loads((run_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    data = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]
    assert inside(base, venv) and inside(data, venv), (base, data)


@pytest.mark.slow
def test_kto_lite_app_help_from_any_folder(venv, tmp_path):
    assert "--host" in run(venv, "kto-lite-app", "--help", cwd=tmp_path).stdout

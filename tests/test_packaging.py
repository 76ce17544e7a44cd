"""What `pip install .` gives a user: the declared dependencies are the
imported ones, and the wheel carries the configs (presets) and the licence."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "saat_dist"
# used only under a config key (tracking.mlflow_tracking_uri), declared as an extra
OPTIONAL = {"mlflow-skinny"}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> tuple[set[str], set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {_normal(re.split(r"[\[<>=!~ ]", d, maxsplit=1)[0]) for d in project["dependencies"]}
    extras = {_normal(re.split(r"[\[<>=!~ ]", d, maxsplit=1)[0])
              for deps in project.get("optional-dependencies", {}).values() for d in deps}
    return base, extras


def _imported_distributions() -> dict[str, set[str]]:
    """distribution -> the package's modules that import it (every import,
    at module level or inside a function)."""
    stdlib = set(sys.stdlib_module_names)
    owners = importlib.metadata.packages_distributions()
    out: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in stdlib or top in ("saat_dist", "__future__"):
                    continue
                dists = owners.get(top)
                assert dists, f"{path.relative_to(ROOT)} imports {top}, which no installed distribution provides"
                for dist in dists:
                    out.setdefault(_normal(dist), set()).add(str(path.relative_to(ROOT)))
    return out


def test_the_declared_dependencies_are_the_imported_ones():
    base, extras = _declared()
    imported = _imported_distributions()
    undeclared = {d: sorted(f)[:3] for d, f in imported.items() if d not in base | extras}
    assert undeclared == {}, "imported but not declared in pyproject.toml"
    unused = sorted(base - set(imported))
    assert unused == [], "declared in pyproject.toml but never imported"
    assert extras == OPTIONAL  # loaded by Ray's MLflow integration (tests/test_tracking.py)


def test_every_pyproject_dependency_is_pinned_in_requirements():
    base, extras = _declared()
    pins = {_normal(line.split("==")[0].split("[")[0]) for f in ("requirements.txt", "requirements-dev.txt")
            for line in (ROOT / f).read_text().splitlines() if "==" in line and not line.startswith("#")}
    assert (base | extras) - pins == set()


@pytest.mark.slow
def test_a_plain_install_ships_the_configs_and_the_licence(tmp_path):
    """Build the wheel, install it into a folder of its own and run
    `saat-dist config show --preset paper/nus-wide` from there."""
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(wheels), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("saat_dist-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "saat_dist/configs/paper/nus-wide.yaml" in names and "saat_dist/configs/demo.yaml" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    code = ("import saat_dist, sys; from saat_dist.cli import main; print(saat_dist.__file__, file=sys.stderr); "
            "sys.exit(main(['config', 'show', '--preset', 'paper/nus-wide']))")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)})
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert shown.stderr.strip().splitlines()[-1].startswith(str(target))  # the installed copy, not the checkout
    assert "backbone: alexnet" in shown.stdout and "image_size: 224" in shown.stdout

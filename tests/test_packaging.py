"""`pip install .` ships conf/ inside the wheel, and `python -m qprune` finds it from any directory."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_ships_every_config_and_runs_from_anywhere(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "wheel"), str(REPO)],
                   check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "wheel").glob("qprune-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"qprune/conf/{p.relative_to(REPO / 'conf').as_posix()}" for p in (REPO / "conf").rglob("*.yaml")}
    assert configs and configs <= names, sorted(configs - names)
    assert "qprune/__main__.py" in names
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-m", "qprune", "model=conv4", "algebra=quat", "--cfg", "job"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "name: conv4" in out.stdout and "name: quat" in out.stdout
    probe = subprocess.run([sys.executable, "-c", "import qprune.cli as c; print(c.config_dir())"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == str(target / "qprune" / "conf")

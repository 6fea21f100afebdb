"""The embedded demo model resolves from a non-editable install too."""

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_carries_the_checkpoint_and_resolves_it(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True)
    (wheel,) = (tmp_path / "dist").glob("factedit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith("data/share/factedit/checkpoints/demo-world/model.safetensors") for n in names)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    # the dependencies (torch, transformers...) come from this environment's site-packages;
    # its .pth files (the editable install of factedit) are not processed from there
    (site,) = (env_dir / "lib").glob("python*/site-packages")
    deps = [p for p in sys.path if p.endswith("site-packages")]
    (site / "deps.pth").write_text("\n".join(deps) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
                    str(wheel)], check=True)
    out = subprocess.run(
        [str(py), "-c", "import factedit.paths as p, factedit; print(p.demo_checkpoint()); print(factedit.__file__)"],
        check=True, capture_output=True, text=True, cwd=tmp_path,
    ).stdout.split()
    assert out[0] == str(env_dir / "share" / "factedit" / "checkpoints" / "demo-world")
    assert str(env_dir) in out[1]

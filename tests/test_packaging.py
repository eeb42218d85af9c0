"""pyproject.toml: the wheel `pip install .` builds holds the whole package and the helper, with the dependencies of
requirements.txt."""
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def requirement_names(lines):
    return {re.split(r"[<>=\[ ]", line.strip())[0].lower() for line in lines if line.strip() and line[0] != "#"}


def test_the_wheel_holds_every_module_of_the_package_and_the_helper(tmp_path):
    source = tmp_path / "source"  # a copy: building leaves build/ and *.egg-info beside the sources
    shutil.copytree(REPO / "fedgan", source / "fedgan", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("fedgan_utils.py", "pyproject.toml", "README.md", "LICENSE", "requirements.txt"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(source)], check=True, capture_output=True, timeout=300)
    wheel, = tmp_path.glob("fedgan-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(REPO).as_posix() for p in (REPO / "fedgan").rglob("*.py")}
    assert sources and sources <= names, sorted(sources - names)
    assert "fedgan_utils.py" in names
    assert "fedgan/flower/app/pyproject.toml" in names  # the Flower App's manifest, which `flwr run` packs
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    required = requirement_names(line.split(":", 1)[1] for line in metadata.splitlines()
                                 if line.startswith("Requires-Dist:") and "extra ==" not in line)
    extras = requirement_names(line.split(":", 1)[1].split(";")[0] for line in metadata.splitlines()
                               if line.startswith("Requires-Dist:") and "extra ==" in line)
    listed = requirement_names((REPO / "requirements.txt").read_text().splitlines())
    assert required | extras == listed  # the same dependencies as the two commands install
    assert {"torch", "numpy", "dp-accounting"} <= required and {"pytest", "flwr"} <= extras
    assert "flwr" not in required  # a notebook user does not need Flower

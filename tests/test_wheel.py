"""The wheel and the sdist: ``python -m build`` makes both from a copy of the checkout, ``twine
check`` passes their metadata, and the wheel installed alone into a fresh virtual environment
(the checkout nowhere on its path) imports, runs ``gqc-train --quick`` and says which extra a
missing framework comes with. The fresh environment borrows the test environment's installed
dependencies (torch included) through a path file instead of downloading them again; a full
install with torch pinned first is the README's first command.

Oracle: the package's own version string, where the imported module lives, the run's summary."""

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import gqc_dist

REPO = Path(__file__).resolve().parent.parent
LEFT_OUT = (".git", ".venv", "build", "dist", "runs", "__pycache__", "*.egg-info", "out", "results", ".pytest_cache")


def _run(*args, cwd, timeout=300):
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """The sdist and the wheel, built from a copy of the checkout (the build writes beside its
    sources)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*LEFT_OUT))
    _run(sys.executable, "-m", "build", "--outdir", root / "dist", source, cwd=root)
    return root, sorted((root / "dist").iterdir())


def test_build_makes_a_wheel_and_an_sdist_whose_metadata_passes(dist):
    root, files = dist
    version = gqc_dist.__version__
    assert [f.name for f in files] == [f"gqc_dist-{version}-py3-none-any.whl", f"gqc_dist-{version}.tar.gz"]
    checked = _run(sys.executable, "-m", "twine", "check", *files, cwd=root)
    assert checked.stdout.count("PASSED") == 2, checked.stdout
    names = zipfile.ZipFile(files[0]).namelist()
    assert "gqc_dist/core/session.py" in names and "gqc_dist/train/cli.py" in names
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in names)
    entry = zipfile.ZipFile(files[0]).read(f"gqc_dist-{version}.dist-info/entry_points.txt").decode()
    assert "gqc-train = gqc_dist.train.cli:entry" in entry
    # the examples a user copies travel in the sdist (README.md says where they are)
    import tarfile

    members = tarfile.open(files[1]).getnames()
    for example in ("configs/train_ddp.json", "launch/slurm.sbatch", "launch/torchrun.sh"):
        assert f"gqc_dist-{version}/{example}" in members


def test_the_wheel_alone_installs_runs_gqc_train_and_names_missing_extras(dist, tmp_path):
    root, files = dist
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path)
                .stdout.strip())
    # the dependencies as installed for the tests (a path line adds the folder only: the
    # checkout's editable-install hook there is not run)
    (site / "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", files[0], cwd=tmp_path)

    where = _run(python, "-c", "import gqc_dist, json; print(json.dumps([gqc_dist.__file__, gqc_dist.__version__]))",
                 cwd=tmp_path)
    module, version = json.loads(where.stdout)
    assert Path(module).is_relative_to(site) and version == gqc_dist.__version__

    out = tmp_path / "run"
    _run(venv / "bin" / "gqc-train", "--quick", "--no-progress", "--out-dir", out, cwd=tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["optimizer_steps"] > 0

    for module, extra, use in (("transformers", "hf", "import gqc_dist.frontends.hf"),
                               ("lightning", "lightning", "import gqc_dist.frontends.lightning"),
                               ("torchtitan", "torchtitan", "import gqc_dist.frontends.torchtitan"),
                               ("deepspeed", "deepspeed", "import gqc_dist.frontends.deepspeed as d; d.initialize()"),
                               ("mpi4py", "mpi", "from gqc_dist.train import mpi_env; mpi_env.discover()")):
        code = (f"import sys; sys.modules[{module!r}] = None\n"
                f"try:\n    {use}\n"
                "except Exception as error:\n    print(type(error).__name__, error)")
        said = _run(python, "-c", code, cwd=tmp_path).stdout
        assert said.startswith("GQCUsageError ") and f"pip install 'gqc_dist[{extra}]'" in said, said

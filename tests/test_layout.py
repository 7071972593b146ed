"""The package's folders show its layers (issue 31), and the import paths from before them still
work. Oracles: the source files themselves (line counts, import statements) and the module objects
the old and new names give."""

import ast
import importlib
from pathlib import Path

import pytest

import gqc_dist
from gqc_dist._moved import MOVED

PACKAGE = Path(gqc_dist.__file__).parent
# what each folder may import from the rest of gqc_dist: the micro-step chain, the adapters and
# the decision rules know no front end, no gqc-train and no sweep; an adapter knows no rule
FORBIDDEN = {
    "core": ("gqc_dist.frontends", "gqc_dist.train", "gqc_dist.sweep", "gqc_dist.algorithms", "gqc_dist.config"),
    "engines": ("gqc_dist.frontends", "gqc_dist.train", "gqc_dist.sweep", "gqc_dist.algorithms", "gqc_dist.config",
                "gqc_dist.core.wrapper", "gqc_dist.core.micro_step", "gqc_dist.core.rules"),
    "algorithms": ("gqc_dist.frontends", "gqc_dist.train", "gqc_dist.sweep", "gqc_dist.engines.deepspeed"),
}


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import"  # absolute names: the layers read in the imports
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_lower_layers_never_import_higher_ones(folder):
    found = [f"{path.relative_to(PACKAGE)} imports {name}"
             for path in sorted((PACKAGE / folder).rglob("*.py")) for name in _imports(path)
             if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[folder])]
    assert found == []


def test_the_tree_says_where_each_layer_lives():
    assert (PACKAGE / "core" / "micro_step.py").is_file() and (PACKAGE / "core" / "wrapper.py").is_file()
    adapters = {p.name for p in (PACKAGE / "engines").glob("*.py")}
    assert {"torch_optimizer.py", "deepspeed_zero.py", "fsdp2.py"} <= adapters
    assert {p.name for p in (PACKAGE / "frontends").glob("*.py")} >= {"deepspeed.py", "hf.py", "accelerate.py",
                                                                      "lightning.py", "torchtitan.py"}
    flat = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert flat == ["__init__.py", "_moved.py", "atomic_file.py", "config.py", "errors.py", "extras.py",
                    "schedules.py", "validation.py"]


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_import_path_gives_the_module_itself(old):
    if any(old.endswith(f".{name}") for name in ("hf", "accelerate", "lightning", "torchtitan")):
        pytest.importorskip(old.rsplit(".", 1)[1].replace("hf", "transformers"))
    assert importlib.import_module(old) is importlib.import_module(MOVED[old])

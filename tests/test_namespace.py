"""Everything this distribution installs lives under the one import name `rfserve`, and no top-level name it
installs is also installed by another distribution. Hugging Face's `kernels` (which transformers requires) took
the name of our old top-level `kernels/`; this environment has it installed, so the check is not vacuous."""
import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OLD_NAMES = ("server", "kernels", "model_zoo", "benchmarks")


def _ours() -> set[str]:
    """The top-level import names the installed rfserve distribution provides."""
    return {name for name, dists in importlib.metadata.packages_distributions().items() if "rfserve" in dists}


@pytest.mark.smoke
def test_rfserve_installs_one_top_level_name_that_no_other_distribution_installs():
    shared = {name: dists for name, dists in importlib.metadata.packages_distributions().items()
              if "rfserve" in dists and set(dists) - {"rfserve"}}
    assert _ours() == {"rfserve"}, _ours()
    assert shared == {}, f"top-level names also installed by other distributions: {shared}"


def test_hugging_face_kernels_is_installed_and_is_what_import_kernels_finds():
    """Not in the smoke subset: an older transformers may refuse this kernels release, which is not ours to fix."""
    assert "kernels" in importlib.metadata.packages_distributions(), "the test environment must have HF kernels"
    from rfserve import kernels as ours
    from transformers.utils import is_kernels_available

    assert Path(ours.__file__).parent == REPO / "rfserve" / "kernels"
    assert is_kernels_available()   # transformers sees theirs, not ours
    spec = importlib.util.find_spec("kernels")
    assert spec is not None and Path(spec.origin).parent != Path(ours.__file__).parent


@pytest.mark.smoke
@pytest.mark.parametrize("name", [n for n in OLD_NAMES if n != "kernels"])
def test_old_top_level_names_are_not_importable_outside_the_repo(name, tmp_path):
    """Run from an empty folder, so the repository root is not on sys.path as it is for pytest."""
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({name!r}) is not None)"
    assert subprocess.run([sys.executable, "-c", probe], cwd=tmp_path).returncode == 0


@pytest.mark.smoke
def test_the_rfserve_script_resolves_inside_the_namespace():
    (entry,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "rfserve"]
    assert entry.value == "rfserve.server.cli:main"

"""constraints.txt is the dependency set the tests pass with: every install path uses it, and it agrees with
pyproject.toml's ranges, so a change to either that forgets the other fails here rather than at an install."""
import re
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict[str, str]:
    """The pin of each package for this interpreter (markers evaluated)."""
    found = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and line[0] not in "# ":
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate():
                (spec,) = req.specifier
                found[canonicalize_name(req.name)] = spec.version
    return found


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    return [Requirement(r) for r in project["dependencies"] + extras]


def test_every_declared_dependency_is_pinned_inside_its_range():
    pinned = pins()
    env = {**default_environment(), "extra": ""}
    for req in declared():
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        assert name in pinned, f"{name} is declared but constraints.txt lacks it: run bash .ci/lock.sh"
        assert req.specifier.contains(pinned[name], prereleases=True), f"{name}=={pinned[name]} is outside {req}"


def test_the_pins_are_what_this_environment_runs():
    """The test environment is installed with the constraints, so its versions are the pinned ones."""
    from importlib.metadata import version

    pinned = pins()
    for name in ("torch", "transformers", "diffusers", "huggingface-hub", "kernels", "fastapi", "pydantic"):
        assert version(name).split("+")[0] == pinned[name], name


def test_readme_ci_and_dockerfile_install_with_the_constraints_and_its_torch():
    torch = pins()["torch"]
    readme = (ROOT / "README.md").read_text()
    installs = re.findall(r"^pip install .*$", readme, re.M)
    assert len(installs) >= 2
    for line in installs:
        assert f"torch=={torch} -c constraints.txt " in line, line
    assert "-c constraints.txt" in (ROOT / ".ci/run").read_text()
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"ARG TORCH_VERSION={torch}" in dockerfile and "pip install -c constraints.txt" in dockerfile

"""Do the wheels fetch_wheels.sh carries resolve together with what the device image already holds?

    python3 benchmarks/gpu/check_wheels.py [--missing] [.whl]
    python3 benchmarks/gpu/check_wheels.py --pin NAME...

Every requirement of every carried wheel, with its markers evaluated for the image (CPython 3.12, x86-64
Linux), must be met by a carried wheel, or by the image's own version of that package (IMAGE, as the device
tool's KINDS.md lists it). A carried wheel overrides the image's version, since it comes first on the path.
Packages the image holds at a version nobody recorded count as met. Anything else is printed, and the exit
status is 1, so that a device call never starts on a set that cannot import. With `--missing`, it prints only
the names of the packages to carry, neither carried nor in the image or in the image at a version a carried
wheel refuses, which fetch_wheels.sh then fetches. With `--pin`, it
prints NAME==VERSION for each name that constraints.txt pins for the image's platform: the versions the tests
passed with, whatever is installed where the wheels are fetched.
"""
from __future__ import annotations

import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

# The nvidia-h200 image, as read on 2026-11-17 (KINDS.md): versions where recorded...
IMAGE = {"torch": "2.11.0", "triton": "3.6.0", "transformers": "5.17.0", "torchvision": "0.26.0",
         "numpy": "2.5.2", "safetensors": "0.8.0", "tokenizers": "0.23.2", "huggingface-hub": "1.33.0",
         "accelerate": "1.15.0", "sentencepiece": "0.2.2", "tiktoken": "0.14.0"}
# ...and the packages it holds at versions nobody recorded.
PRESENT = {"aiohttp", "annotated-doc", "anyio", "attrs", "certifi", "charset-normalizer", "click", "filelock",
           "fsspec", "h11", "hf-xet", "httpcore", "httpx", "idna", "jinja2", "lazy-loader", "markupsafe",
           "matplotlib", "packaging", "pillow", "prometheus-client", "protobuf", "psutil", "pyyaml", "regex",
           "requests", "rich", "scipy", "setuptools", "shellingham", "sniffio", "tqdm", "typer",
           "typing-extensions", "urllib3", "uvloop", "pytest", "pytest-timeout", "hypothesis",
           "opencv-python-headless", "cuda-bindings", "networkx", "sympy", "mpmath", "importlib-metadata", "zipp",
           "pygments", "markdown-it-py", "mdurl", "yarl", "multidict", "frozenlist", "aiosignal", "propcache",
           "aiohappyeyeballs", "pyparsing", "python-dateutil", "six"}
ENVIRONMENT = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
               "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
               "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(zf.read(name).decode())
    return [Requirement(line) for line in meta.get_all("Requires-Dist") or []]


def problems(folder: Path) -> list[tuple[str, str]]:
    """(message, the name of a package to carry, or "" where a carried version is wrong) per unmet requirement."""
    carried = {}
    for wheel in sorted(folder.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        carried[canonicalize_name(name)] = (version, wheel)
    found = []
    for name, (_, wheel) in carried.items():
        for req in requirements(wheel):
            if req.marker is not None and not req.marker.evaluate(ENVIRONMENT):
                continue
            dep = canonicalize_name(req.name)
            have = carried[dep][0] if dep in carried else Version(IMAGE[dep]) if dep in IMAGE else None
            if have is None and dep in PRESENT:
                continue
            if have is None:
                found.append((f"{name} needs {req}: neither carried nor in the image", dep))
            elif not req.specifier.contains(have, prereleases=True):   # the image's can be overridden by carrying one
                where = "carried" if dep in carried else "the image's"
                found.append((f"{name} needs {req}, but {where} {dep} is {have}", "" if dep in carried else dep))
    return found


def pins(names: list[str], constraints: Path = Path("constraints.txt")) -> list[str]:
    """constraints.txt's pin of each name, its markers evaluated for the image (a name it lacks is left out)."""
    wanted = {canonicalize_name(n) for n in names}
    found = []
    for line in constraints.read_text().splitlines():
        if not line or line[0] in "# ":
            continue
        req = Requirement(line)
        if canonicalize_name(req.name) in wanted and (req.marker is None or req.marker.evaluate(ENVIRONMENT)):
            found.append(f"{canonicalize_name(req.name)}{req.specifier}")
    return found


def main() -> None:
    if sys.argv[1:2] == ["--pin"]:
        print("\n".join(pins(sys.argv[2:])))
        return
    args = [a for a in sys.argv[1:] if a != "--missing"]
    folder = Path(args[0] if args else ".whl")
    found = problems(folder)
    if "--missing" in sys.argv:
        print("\n".join(sorted({dep for _, dep in found if dep})))
        return
    for line, _ in found:
        print(line)
    count = len(list(folder.glob("*.whl")))
    print(f"{count} wheels: {'they resolve with the image' if not found else f'{len(found)} unmet requirements'}")
    sys.exit(1 if found or not count else 0)


if __name__ == "__main__":
    main()

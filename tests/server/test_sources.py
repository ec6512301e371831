"""The SPECs and checkpoint folders the CLI checks before it imports the model libraries (server.sources)."""
import subprocess
import sys

import pytest
from huggingface_hub import constants

from rfserve.model_zoo.loading import CheckpointError
from rfserve.server.sources import LoadError, find_sources, model_specs


def test_the_checks_import_no_model_library():
    """What makes a typo's refusal take a second: neither torch nor diffusers nor transformers is imported."""
    code = ("import sys, rfserve.server.cli, rfserve.server.sources; "
            "heavy = {'torch', 'diffusers', 'transformers'} & set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_local_folders_are_found_and_online_hub_ids_left_to_the_engine(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    specs = model_specs([f"instaflow-2rf={tmp_path}", "instaflow-0.9b", "synthetic"], None)
    # The hub id may still download, after the memory plan is logged; synthetic needs no checkpoint.
    assert find_sources(specs) == {"instaflow-2rf": tmp_path.resolve()}


def test_a_missing_source_raises_what_loading_it_would(tmp_path, monkeypatch):
    with pytest.raises(LoadError, match=r"model 'instaflow-0.9b' \(.*nope\) failed while loading: .*no such folder"):
        find_sources(model_specs([f"instaflow-0.9b={tmp_path}/nope"], None))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(LoadError, match="not in the local HF cache and HF_HUB_OFFLINE is set"):
        find_sources(model_specs(["instaflow-0.9b"], None))


def test_a_bad_spec_or_a_source_outside_the_model_root_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="unknown model preset 'sdxl'"):
        model_specs(["sdxl=foo/bar"], None)
    with pytest.raises(CheckpointError, match="outside the model root"):
        model_specs([f"instaflow-0.9b={tmp_path}"], str(tmp_path / "root"))

"""`rfserve serve -h` says what leaving each flag out means, which presets there are and which of them chat."""
import re

import pytest

from rfserve.model_zoo.presets import PRESETS
from rfserve.server.cli import main


@pytest.fixture
def serve_help(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "-h"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def options(text: str) -> dict[str, str]:
    """Each option's help entry, whitespace folded, by its first flag ("--port PORT  ..." -> "--port")."""
    entries = re.split(r"\n  (?=-)", text.split("\noptions:\n", 1)[1])
    return {entry.split()[0].rstrip(","): " ".join(entry.split()) for entry in entries[1:] if entry.strip()}


def test_every_flag_that_takes_a_value_says_its_default(serve_help):
    entries = options(serve_help)
    assert "(default: 8000)" in entries["--port"] and "(default: 127.0.0.1)" in entries["--host"]
    assert "(default: 10.0)" in entries["--max-wait-ms"]
    assert "each model's own" in entries["--max-steps"]
    # A flag with a metavar takes a value; a bare switch (--debug, --no-warmup) is off unless given.
    valued = {flag: entry for flag, entry in entries.items() if re.match(r"-\S+ [A-Z{]", entry)}
    assert len(valued) > 25
    assert [flag for flag, entry in valued.items() if "default" not in entry] == []
    assert "None" not in serve_help and "default: []" not in serve_help


def test_help_names_the_presets_and_the_ones_that_chat(serve_help):
    text = " ".join(serve_help.split())
    presets = re.search(r"presets: (.*?)\. These", text).group(1).split(", ")
    chatting = re.search(r"These also chat \(POST /v1/chat/completions\): (.*?)\.$", text).group(1).split(", ")
    assert presets == list(PRESETS)
    assert chatting == ["janusflow-1.3b", "janus-pro-1b", "janus-pro-7b"]     # Janus-Pro chats as well
    assert "for the models that chat (janusflow-1.3b, janus-pro-1b, janus-pro-7b)" in text

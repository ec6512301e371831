"""Chat settings: a flag beats its environment variable, which beats the default."""
import pytest

from rfserve.server.chat.config import ChatConfig
from rfserve.server.cli import _chat_config, build_parser


def test_flags_then_environment_then_defaults(monkeypatch):
    monkeypatch.setenv("RFSERVE_CHAT_SLOTS", "7")
    monkeypatch.setenv("RFSERVE_CHAT_MAX_IMAGES", "2")
    monkeypatch.setenv("RFSERVE_CHAT_IMAGE_HOSTS", "a.example, B.example")
    args = build_parser().parse_args(["serve", "--chat-slots", "3", "--chat-image-host", "c.example"])
    cfg = _chat_config(args)
    assert (cfg.slots, cfg.max_images, cfg.max_waiting) == (3, 2, 256)
    assert cfg.image_hosts == frozenset({"c.example"})
    assert ChatConfig.resolve({}, []).image_hosts == frozenset({"a.example", "b.example"})


def test_slots_follow_the_device_unless_set():
    assert ChatConfig().slots_on("cuda") == 32 and ChatConfig().slots_on("cpu") == 4
    assert ChatConfig(slots=5).slots_on("cuda") == 5


def test_a_bad_setting_is_one_clear_error(monkeypatch, capsys):
    monkeypatch.setenv("RFSERVE_CHAT_MAX_LEN", "lots")
    with pytest.raises(SystemExit):
        _chat_config(build_parser().parse_args(["serve"]))
    assert "RFSERVE_CHAT_MAX_LEN must be an integer, got 'lots'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _chat_config(build_parser().parse_args(["serve", "--chat-slots", "0"]))
    assert "--chat-slots must be at least 1" in capsys.readouterr().err
    monkeypatch.setenv("RFSERVE_CHAT_MAX_LEN", "0")               # the environment is held to the same bound
    with pytest.raises(SystemExit):
        _chat_config(build_parser().parse_args(["serve"]))
    assert "RFSERVE_CHAT_MAX_LEN must be at least 1" in capsys.readouterr().err

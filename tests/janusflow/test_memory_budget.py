"""Chat KV sized from the memory budget at start (server/memory.py): what warm-up left, shared by tokens among
the chat models, never more than every sequence at full length, never less than one; too little fails the start
with one line naming what to change. The used figure is pinned (`used_bytes`), so the pool's size is exact."""
import pytest

import rfserve.server.memory as memory
from rfserve.model_zoo.paged_kv import PAGE, blocks_for
from rfserve.server.chat.batcher import ChatSequence
from rfserve.server.config import ServerConfig
from rfserve.server.engine import Engine, LoadError
from rfserve.server.memory import ChatNeed, KVBudgetTooSmall, chat_blocks
from tests.janusflow.test_chat_batcher import Collector, prompt_inputs

MODEL = "janusflow-1.3b"


def test_blocks_are_shared_by_tokens_and_capped_and_floored():
    a, b = ChatNeed("a", 100, 256), ChatNeed("b", 300, 256)
    blocks = chat_blocks([a, b], free=400 * 1600, max_seqs=8)          # 1,600 tokens each
    assert blocks == {"a": 1600 // PAGE + 1, "b": 1600 // PAGE + 1}
    roomy = chat_blocks([a, b], free=10 ** 9, max_seqs=4)               # capped at 4 × 256 tokens each
    assert roomy == {"a": 4 * blocks_for(256) + 1, "b": 4 * blocks_for(256) + 1}
    with pytest.raises(KVBudgetTooSmall, match="--chat-max-len") as err:
        chat_blocks([a], free=100 * 200, max_seqs=4)                    # 200 tokens < one sequence of 256
    assert err.value.name == "a"


def test_a_containers_memory_limit_bounds_the_cpu_total(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "CGROUP_LIMITS", ())
    host = memory.host_memory()                         # the machine's RAM alone
    unlimited, limited = tmp_path / "v2", tmp_path / "v1"
    unlimited.write_text("max\n")
    limited.write_text(f"{host // 4}\n")
    monkeypatch.setattr(memory, "CGROUP_LIMITS", (unlimited, tmp_path / "absent"))
    assert memory.host_memory() == host
    monkeypatch.setattr(memory, "CGROUP_LIMITS", (unlimited, limited))
    assert memory.host_memory() == host // 4


def budget_for(tokens: int, bytes_per_token: int, utilization: float = 0.9) -> int:
    """A device memory whose budget, with nothing used, holds `tokens` of KV."""
    return int(tokens * bytes_per_token / utilization) + 1


@pytest.fixture
def nothing_used(monkeypatch):
    monkeypatch.setattr(memory, "used_bytes", lambda device: 0)


def test_the_pool_takes_the_budget_and_streams_beyond_it_still_finish(tiny_janus, nothing_used):
    probe = Engine(ServerConfig(models=[f"{MODEL}={tiny_janus}"], device="cpu", warmup=False))
    probe.load(progress=False)
    per_token, max_len = probe.models[MODEL].chat.kv_bytes_per_token, probe.chat_max_len(MODEL)
    probe.shutdown()
    tokens = max_len + 4 * PAGE                      # one full sequence and a little more: 4 slots must share it
    engine = Engine(ServerConfig(models=[f"{MODEL}={tiny_janus}"], device="cpu", warmup=False,
                                 device_memory=budget_for(tokens, per_token)))
    engine.load(progress=False)
    try:
        assert engine.kv_blocks[MODEL] == tokens // PAGE + 1
        pipe = engine.models[MODEL].pipeline        # its text-to-image KV pool was held before the budget was read
        lm = pipe.parts.model.language_model.config
        longest = -(-(len(pipe.parts.processor.t2i_prefix("")) + pipe.max_prompt_tokens) // 64) * 64
        assert pipe.kv_pool.flat[0].numel() == 2 * 8 * (longest + 1 + pipe.parts.num_gen_tokens) * \
            lm.num_key_value_heads * (lm.hidden_size // lm.num_attention_heads)
        batcher = engine.chat_batcher(MODEL)
        assert batcher.decoder.num_blocks == tokens // PAGE + 1
        parts, sinks = engine.chat_parts(MODEL), []
        for question in ("hi", "what color is the sky", "count 0 1 2 3 4", "and again"):
            ids, pixels, positions = prompt_inputs(parts, question, [])
            sinks.append(Collector())
            batcher.submit(ChatSequence(ids, pixels, positions, 120, 0.0, 1.0, [], None, sinks[-1]))
        for sink in sinks:
            assert sink.done.wait(120)
            assert [e.finish_reason for e in sink.events if e.finish_reason] in (["stop"], ["length"])
        assert batcher.preemptions > 0, "four streams of up to 120 tokens fit a pool this small without preempting"
    finally:
        engine.shutdown()


def test_a_budget_below_one_sequence_fails_the_start_in_one_line(tiny_janus, nothing_used):
    engine = Engine(ServerConfig(models=[f"{MODEL}={tiny_janus}"], device="cpu", warmup=False,
                                 device_memory=10_000))
    with pytest.raises(LoadError, match=r"janusflow-1\.3b.*sizing its chat KV cache.*--chat-max-len") as err:
        engine.load(progress=False)
    assert "\n" not in str(err.value)
    engine.shutdown()

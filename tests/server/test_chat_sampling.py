"""Chat's batched next-token choice: greedy rows are the argmax, sampled rows follow softmax(logits / T) cut to
their own top-p, and a seeded row's token depends on its seed alone, never on its batch-mates."""
import torch

from rfserve.model_zoo.seeding import generators
from rfserve.server.chat.sampling import next_tokens, top_p_filter


def test_top_p_keeps_the_smallest_set_reaching_each_rows_mass():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]] * 3)
    kept = top_p_filter(probs, torch.tensor([[0.8], [0.5], [1.0]]))
    torch.testing.assert_close(kept[0], torch.tensor([0.0, 0.625, 0.0, 0.375]))
    torch.testing.assert_close(kept[1], torch.tensor([0.0, 1.0, 0.0, 0.0]))      # the first token reaches 0.5
    torch.testing.assert_close(kept[2], probs[2])


def test_rows_mix_greedy_and_sampled_and_sample_per_seed():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    temps, top_ps = [0.0, 1.0, 0.0, 0.7], [1.0, 0.9, 1.0, 1.0]
    batch = next_tokens(logits, temps, top_ps, generators([0, 11, 0, 12]))
    assert batch[0] == int(logits[0].argmax()) and batch[2] == int(logits[2].argmax())
    for row, seed in ((1, 11), (3, 12)):                                          # alone, the same token
        assert next_tokens(logits[row:row + 1], [temps[row]], [top_ps[row]], generators([seed])) == [batch[row]]


def test_sampled_tokens_follow_the_distribution_within_top_p():
    """Token k with probability ∝ p_k among those top-p keeps; a token top-p cuts is never drawn."""
    logits = torch.log(torch.tensor([0.6, 0.25, 0.1, 0.05])).expand(4000, 4)
    drawn = torch.tensor(next_tokens(logits, [1.0] * 4000, [0.9] * 4000, generators(list(range(4000)))))
    share = torch.bincount(drawn, minlength=4).float() / 4000
    assert share[3] == 0                                                           # 0.6 + 0.25 + 0.1 ≥ 0.9
    torch.testing.assert_close(share[:3], torch.tensor([0.6, 0.25, 0.1]) / 0.95, atol=0.03, rtol=0)


def _full_sort_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The definition, over the whole sorted vocabulary."""
    sorted_p, order = probs.sort(descending=True)
    sorted_p = torch.where(sorted_p.cumsum(-1) - sorted_p < top_p, sorted_p, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return kept / kept.sum(-1, keepdim=True)


def test_top_p_over_a_large_vocabulary_equals_the_full_sort():
    """Peaked rows (the head holds their mass) and flat rows (it does not, so the whole vocabulary sorts)."""
    gen = torch.Generator().manual_seed(1)
    for scale in (12.0, 0.5):
        probs = torch.softmax(torch.randn(3, 5000, generator=gen) * scale, dim=-1)
        got = top_p_filter(probs, torch.full((3, 1), 0.9))
        torch.testing.assert_close(got, _full_sort_top_p(probs, 0.9))
        assert ((got > 0).sum(-1) > 256).any() == (scale < 1)                    # which path the case took

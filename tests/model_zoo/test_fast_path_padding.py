"""A captured hot call whose rows are independent serves a call between its buckets by padding the batch to the
next captured one: which captured call a key fits, and that the rows it returns are the call's own."""
import torch

from rfserve.model_zoo.fast_path import Captured, call_key


def captured_for(*batches: int, pads: bool = True) -> tuple[Captured, list[int]]:
    """A Captured whose "compiled" call records the rows it ran, captured at `batches` rows of
    (x (n, 4, 8, 8), t (n,), emb (n, 77, 16), rope (64, 8))."""
    ran: list[int] = []

    def fast(x, t, emb=None, rope=None):
        ran.append(x.shape[0])
        return (x * 2 + t[:, None, None, None],)

    c = Captured(eager=lambda *a, **k: ("eager",), fast=fast, capturing=False, pads=pads)
    for n in batches:
        c.shapes.add(call_key(*args_for(n)))
    return c, ran


def args_for(n: int, rope_rows: int = 64) -> tuple[tuple, dict]:
    return (torch.randn(n, 4, 8, 8), torch.arange(n, dtype=torch.float32)), \
        {"emb": torch.randn(n, 77, 16), "rope": torch.randn(rope_rows, 8)}


def test_a_call_between_buckets_runs_padded_in_the_next_and_returns_its_own_rows():
    c, ran = captured_for(2, 4, 8)
    args, kwargs = args_for(3)
    (out,) = c(*args, **kwargs)
    assert ran == [4] and out.shape == (3, 4, 8, 8)
    assert torch.equal(out, args[0] * 2 + args[1][:, None, None, None])
    assert c.padded(call_key(*args_for(5))) == 8 and c.padded(call_key(*args_for(9))) is None


def test_no_padding_where_another_dimension_differs_or_the_call_does_not_pad():
    c, ran = captured_for(4)
    assert c.padded(call_key(*args_for(3, rope_rows=32))) is None          # a non-batch tensor differs
    assert c(*args_for(3)[0], **args_for(3, rope_rows=32)[1]) == ("eager",)
    plain, ran = captured_for(4, pads=False)
    args, kwargs = args_for(3)
    assert plain(*args, **kwargs) == ("eager",) and ran == []

"""kernels/store_append.py: the Triton append writes what the PyTorch reference writes (and what RaggedKV.append
wrote before it): every new token's key, value and position in the slot after its segment's last, and the
segments' lengths advanced."""
import os

import pytest
import torch

from kvbench.kernels.store_append import append_tokens_reference, append_tokens_triton


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("store_dtype,new_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                   (torch.bfloat16, torch.bfloat16)])
def test_triton_append_equals_the_reference(T, store_dtype, new_dtype):
    g = torch.Generator().manual_seed(T)
    B, H, D = 2, 3, 48
    lengths = torch.tensor([4, 0, 7, 2, 5, 1])
    capacity = lengths + T + torch.tensor([0, 2, 1, 0, 3, 0])  # room for T more, some slack beyond
    start = torch.cumsum(capacity, 0) - capacity
    S = int(capacity.sum())
    stores = [(torch.randn(S, D, generator=g).to(store_dtype), torch.randn(S, D, generator=g).to(store_dtype),
               torch.full((S,), -1, dtype=torch.int32)) for _ in range(2)]
    stores[1] = tuple(t.clone() for t in stores[0])
    # new rows as attention produces them: [B, T, H, D] transposed to [B, H, T, D] (not contiguous)
    k_new = torch.randn(B, T, H, D, generator=g).to(new_dtype).transpose(1, 2)
    v_new = torch.randn(B, T, H, D, generator=g).to(new_dtype).transpose(1, 2)
    pos_new = torch.arange(T)[None, :] + torch.tensor([[100], [200]])
    advanced = [lengths.clone(), lengths.clone()]
    append_tokens_reference(*stores[0], start, advanced[0], k_new, v_new, pos_new)
    append_tokens_triton(*stores[1], start, advanced[1], k_new, v_new, pos_new)
    for a, b in zip(*stores):
        assert torch.equal(a, b)
    for got in advanced:  # both advance the lengths by T (the kernel itself when T == 1)
        assert torch.equal(got, lengths + T)
    # and the reference writes where the segments end
    k, _, pos = stores[0]
    seg, t = 4, T - 1
    assert int(pos[start[seg] + lengths[seg] + t]) == 200 + t
    assert torch.equal(k[start[seg] + lengths[seg] + t], k_new[1, 1, t].to(store_dtype))


def test_a_store_that_does_not_fit_is_refused():
    k = torch.zeros(10, 8)
    with pytest.raises(ValueError, match="contiguous with the new rows' width"):
        append_tokens_triton(k, k.clone(), torch.zeros(10, dtype=torch.int32), torch.zeros(1, dtype=torch.long),
                             torch.zeros(1, dtype=torch.long), torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 1, 16),
                             torch.zeros(1, 1, dtype=torch.long))


def test_a_decoding_append_is_one_launch(monkeypatch):
    """A decoding step appends one token a segment: the kernel advances the lengths itself, so the store's append
    launches nothing else (it added them after the kernel: one launch more a layer, 32 a step for Llama-3.1-8B,
    and the one that broke the chain of kvbench's kernels that programmatic dependent launch overlaps)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import kvbench.kernels.store_append as store_append
    from kvbench.cache import RaggedKV
    monkeypatch.setenv("KVBENCH_TRITON", "1")
    launch, in_kernel, ops = store_append._launch, [0], []

    def counted_launch(*a, **k):  # the interpreter's tensor work inside a kernel is the one launch on the GPU
        in_kernel[0] += 1
        try:
            return launch(*a, **k)
        finally:
            in_kernel[0] -= 1

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not in_kernel[0] and func.overloadpacket.__name__ not in ("view", "_unsafe_view", "empty", "alias",
                                                                          "detach", "transpose", "expand"):
                ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(store_append, "_launch", counted_launch)
    B, H, D = 2, 3, 16
    store = RaggedKV(B, H, D, torch.float32, "cpu")
    store.append(torch.randn(B, H, 5, D), torch.randn(B, H, 5, D), torch.arange(5).expand(B, 5))
    store.reserve(4)
    lengths = store.length.clone()
    new = torch.randn(B, H, 1, D), torch.randn(B, H, 1, D), torch.full((B, 1), 5)
    with Ops():
        store.append(*new)
    assert ops == [] and torch.equal(store.length, lengths + 1), ops

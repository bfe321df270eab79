"""kernels/store_append.py: the Triton append writes what the PyTorch reference writes (and what RaggedKV.append
wrote before it): every new token's key, value and position in the slot after its segment's last."""
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
    append_tokens_reference(*stores[0], start, lengths, k_new, v_new, pos_new)
    append_tokens_triton(*stores[1], start, lengths, k_new, v_new, pos_new)
    for a, b in zip(*stores):
        assert torch.equal(a, b)
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

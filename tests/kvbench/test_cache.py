"""The cache's own pieces that keep the prefill free of device syncs: the first append laid out on the host,
``has_tokens`` known on the host, the padded chunk for cuDNN, compression timed by spans."""
import time

import torch

from kvbench.cache import RaggedKV, SpanTimer, causal_attention, pad_chunk
from kvbench.kernels.decode_attention import ragged_attention_reference


def test_padded_chunk_gives_the_same_attention_on_the_real_rows():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 37, 16, generator=gen)
    k = torch.randn(2, 2, 37, 16, generator=gen)
    v = torch.randn(2, 2, 37, 16, generator=gen)
    out, lse = causal_attention(q, k, v, 0.25)
    qp, kp, vp = pad_chunk(q, k, v, 16)
    assert qp.shape[2] == kp.shape[2] == vp.shape[2] == 48
    out_p, lse_p = causal_attention(qp, kp, vp, 0.25)
    torch.testing.assert_close(out_p[:, :, :37], out, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse_p[:, :, :37], lse, atol=1e-5, rtol=0)
    assert pad_chunk(q[:, :, :32], k[:, :, :32], v[:, :, :32], 16)[0].shape[2] == 32  # a multiple stays as it is


def test_first_append_is_laid_out_like_a_regrowth_and_attends_exactly():
    gen = torch.Generator().manual_seed(1)
    B, H, T, D = 2, 3, 40, 8
    k = torch.randn(B, H, T, D, generator=gen)
    v = torch.randn(B, H, T, D, generator=gen)
    pos = torch.arange(T)[None].expand(B, T)
    store = RaggedKV(B, H, D, torch.float32, "cpu")
    store.extra["acc"] = torch.zeros(0)
    assert not store.has_tokens()
    store.append(k, v, pos)
    assert store.has_tokens()
    cap = T + 16  # the slack a regrowth gives: at least 16 tokens
    assert store.capacity.tolist() == [cap] * (B * H)
    assert store.start.tolist() == [i * cap for i in range(B * H)]
    assert store.length.tolist() == [T] * (B * H) and store.free == 16
    assert store.extra["acc"].shape == (B * H * cap,) and store.nbytes() > 0
    q = torch.randn(B, 6, 1, D, generator=gen)
    out, lse = store.attend(q, 0.3)
    dense_k = k.reshape(B * H * T, D)
    ref_out, ref_lse = ragged_attention_reference(q, dense_k, v.reshape(B * H * T, D),
                                                  torch.arange(B * H) * T, torch.full((B * H,), T), 0.3)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=0)
    store.append(k[:, :, :16], v[:, :, :16], pos[:, :16] + T)  # fits the slack: no regrowth
    assert store.capacity.tolist() == [cap] * (B * H) and store.free == 0


def test_span_timer_sums_its_spans_on_the_cpu():
    timer = SpanTimer("cpu")
    for _ in range(2):
        with timer:
            time.sleep(0.01)
    assert 0.02 <= timer.seconds() < 0.5

"""Per-sequence attention: the same result as stock sdpa on a padded batch, and bit for bit the
result each sequence gets alone (stage_server/per_sequence_attention.py)."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from stage_server.per_sequence_attention import IMPLEMENTATIONS, NAME, mode_for, per_sequence_attention

HEADS, KV_HEADS, DIM = 6, 2, 8


class FakeAttention(torch.nn.Module):
    num_key_value_groups = HEADS // KV_HEADS
    is_causal = True


def padded_mask(leads: list[int], q_len: int, kv_len: int, window: int | None = None) -> torch.Tensor:
    """HF's boolean sdpa mask for left-padded rows: query i (at key index kv_len - q_len + i)
    sees keys from the row's first real one up to itself (and only the last `window`)."""
    query_at = torch.arange(kv_len - q_len, kv_len)[:, None]
    key_at = torch.arange(kv_len)[None, :]
    rows = []
    for lead in leads:
        allowed = (key_at <= query_at) & (key_at >= lead)
        if window is not None:
            allowed &= key_at > query_at - window
        rows.append(allowed)
    return torch.stack(rows)[:, None]


def random_qkv(batch: int, q_len: int, kv_len: int, dtype=torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, HEADS, q_len, DIM, generator=generator).to(dtype)
    k = torch.randn(batch, KV_HEADS, kv_len, DIM, generator=generator).to(dtype)
    v = torch.randn(batch, KV_HEADS, kv_len, DIM, generator=generator).to(dtype)
    return q, k, v


@pytest.mark.parametrize("q_len, kv_len, window", [
    (12, 12, None),  # a padded prefill
    (1, 12, None),  # a decode step over caches of different lengths
    (4, 12, None),  # a later chunk of a prefill, after cached keys
    (12, 12, 4),  # a prefill under a sliding window
    (1, 12, 4),  # a decode step under a sliding window
])
def test_matches_stock_sdpa_on_every_real_query(q_len, kv_len, window):
    leads = [0, 3, 7]
    q, k, v = random_qkv(len(leads), q_len, kv_len)
    mask = padded_mask(leads, q_len, kv_len, window)
    extra = {"sliding_window": window} if window else {}
    want, _ = sdpa_attention_forward(FakeAttention(), q, k, v, mask, scaling=0.3, **extra)
    got, _ = per_sequence_attention(FakeAttention(), q, k, v, mask, scaling=0.3, **extra)
    assert got.shape == want.shape == (len(leads), q_len, HEADS, DIM)
    for row, lead in enumerate(leads):
        real = slice(max(0, lead - (kv_len - q_len)), q_len)  # queries that are not padding
        torch.testing.assert_close(got[row, real], want[row, real], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(got).all(), "padding queries get zeros, not NaN"


@pytest.mark.parametrize("q_len", [10, 1])
def test_a_sequence_in_a_padded_batch_gets_the_bits_it_gets_alone(q_len):
    """bfloat16, where stock sdpa's padded batch rounds differently from the same row alone
    (on these inputs: the prefill at every seed, the decode step at 3 seeds of 10)."""
    length, pad = 10, 5
    for seed in range(10):
        q, k, v = random_qkv(1, q_len, length, torch.bfloat16, seed=seed)
        alone, _ = per_sequence_attention(FakeAttention(), q, k, v, None, scaling=0.25)
        # The same sequence as row 1 of three, left-padded behind a longer neighbour and a shorter one.
        others_q, others_k, others_v = random_qkv(3, q_len, length + pad, torch.bfloat16, seed=100 + seed)
        padding = torch.randn(1, KV_HEADS, pad, DIM).to(torch.bfloat16)
        batch_k = torch.cat([others_k[:1], torch.cat([padding, k], dim=2), others_k[2:]])
        batch_v = torch.cat([others_v[:1], torch.cat([padding, v], dim=2), others_v[2:]])
        batch_q = torch.cat([others_q[:1], q, others_q[2:]])
        mask = padded_mask([0, pad, pad + 3], q_len, length + pad)
        together, _ = per_sequence_attention(FakeAttention(), batch_q, batch_k, batch_v, mask, scaling=0.25)
        assert torch.equal(together[1], alone[0]), f"seed {seed}"


def test_auto_picks_per_sequence_for_16_bit_dtypes_on_cpu_only():
    assert mode_for("auto", torch.bfloat16) == mode_for("per-sequence", torch.float32) == "per-sequence"
    assert mode_for("auto", torch.float16) == "per-sequence"
    assert mode_for("auto", torch.float32) == mode_for("batched", torch.bfloat16) == "batched"
    assert mode_for("auto", torch.bfloat16, "cuda:0") == "batched"
    assert mode_for("per-sequence", torch.bfloat16, "cuda:0") == "per-sequence"
    assert IMPLEMENTATIONS == {"per-sequence": NAME, "batched": "sdpa"}
    with pytest.raises(ValueError, match="attention must be one of"):
        mode_for("fast", torch.float32)


def test_one_mask_shared_by_every_row():
    """A mask without a row per sequence (batch dimension 1) applies to every row."""
    q, k, v = random_qkv(3, 4, 12)
    mask = padded_mask([0], 4, 12)
    want, _ = sdpa_attention_forward(FakeAttention(), q, k, v, mask.expand(3, -1, -1, -1), scaling=0.3)
    got, _ = per_sequence_attention(FakeAttention(), q, k, v, mask, scaling=0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_padding_that_is_not_on_the_left_is_taken_from_the_mask():
    """The coordinator pads on the left only, but the stage protocol allows any 0/1 mask: a row
    with a hole (or a key attended by nobody) must not be run as plain causal."""
    from transformers.masking_utils import sdpa_mask

    padding = torch.tensor([[1, 0, 1, 1, 1, 1], [0, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    mask = sdpa_mask(batch_size=3, q_length=6, kv_length=6, attention_mask=padding)
    q, k, v = random_qkv(3, 6, 6)
    want, _ = sdpa_attention_forward(FakeAttention(), q, k, v, mask, scaling=0.3)
    got, _ = per_sequence_attention(FakeAttention(), q, k, v, mask, scaling=0.3)
    for row, first_real in enumerate([0, 1, 0]):
        torch.testing.assert_close(got[row, first_real:], want[row, first_real:], rtol=1e-5, atol=1e-5)


def test_inputs_it_does_not_implement_go_to_stock_sdpa():
    """Not causal, or queries after cached keys without a mask (a static cache): stock sdpa's answer."""
    q, k, v = random_qkv(2, 4, 12)
    for query, is_causal in ((q, False), (q, None)):  # a non-causal call; 4 queries over 12 keys, no mask
        want, _ = sdpa_attention_forward(FakeAttention(), query, k, v, None, scaling=0.3, is_causal=is_causal)
        got, _ = per_sequence_attention(FakeAttention(), query, k, v, None, scaling=0.3, is_causal=is_causal)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _decode_step_with_counted_calls(dtype, monkeypatch):
    """A decode step whose rows hold caches of a few lengths: returns the batch sizes of the sdpa
    calls it made and, per row, (that row's output in the batch, the row alone)."""
    import stage_server.per_sequence_attention as module

    leads = [0, 4, 0, 9, 4, 4, 0, 11]  # three lengths shared, one row alone
    kv_len = 16
    q, k, v = random_qkv(len(leads), 1, kv_len, dtype, seed=3)
    mask = padded_mask(leads, 1, kv_len)
    calls = []
    real_sdpa = module.functional.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(args[0].shape[0])
        return real_sdpa(*args, **kwargs)

    module.batched_decode_is_exact(dtype, q.device, HEADS, KV_HEADS, DIM, DIM, 0.3)  # probed before counting
    monkeypatch.setattr(module.functional, "scaled_dot_product_attention", counting_sdpa)
    together, _ = per_sequence_attention(FakeAttention(), q, k, v, mask, scaling=0.3)
    monkeypatch.setattr(module.functional, "scaled_dot_product_attention", real_sdpa)
    rows = []
    for row, lead in enumerate(leads):
        alone, _ = per_sequence_attention(FakeAttention(), q[row:row + 1], k[row:row + 1, :, lead:],
                                          v[row:row + 1, :, lead:], None, scaling=0.3)
        rows.append((together[row], alone[0]))
    return calls, rows


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_rows_of_one_length_keep_their_bits_and_share_a_call_where_the_machine_allows(dtype, monkeypatch):
    """Rows of one length go to sdpa in one call where this machine's kernels keep each row's bits
    in a batched call (probed), one call each where they do not; either way every row gets exactly
    what it gets alone."""
    import stage_server.per_sequence_attention as module

    calls, rows = _decode_step_with_counted_calls(dtype, monkeypatch)
    if module.batched_decode_is_exact(dtype, torch.device("cpu"), HEADS, KV_HEADS, DIM, DIM, 0.3):
        assert sorted(calls) == [1, 1, 3, 3], "one call per shared length, the lone row in its own"
    else:
        assert calls == [1] * 8, "one call per row where batched rows lose their bits"
    for row, (together, alone) in enumerate(rows):
        assert torch.equal(together, alone), f"row {row}"


def test_rows_are_not_grouped_where_the_probe_finds_batched_calls_inexact(monkeypatch):
    import stage_server.per_sequence_attention as module

    monkeypatch.setattr(module, "batched_decode_is_exact", lambda *args: False)
    calls, rows = _decode_step_with_counted_calls(torch.float32, monkeypatch)
    assert calls == [1] * 8
    for row, (together, alone) in enumerate(rows):
        assert torch.equal(together, alone), f"row {row}"


def test_the_probe_sees_a_kernel_that_rounds_batched_rows_differently(monkeypatch):
    """A kernel whose batched rows are off by one ulp from the same row alone makes the probe say no."""
    import stage_server.per_sequence_attention as module

    real_sdpa = module.functional.scaled_dot_product_attention

    def drifting_sdpa(query, *args, **kwargs):
        out = real_sdpa(query, *args, **kwargs)
        return torch.nextafter(out, torch.full_like(out, float("inf"))) if query.shape[0] > 1 else out

    monkeypatch.setattr(module.functional, "scaled_dot_product_attention", drifting_sdpa)
    probe = module.batched_decode_is_exact.__wrapped__
    assert probe(torch.float32, torch.device("cpu"), HEADS, KV_HEADS, DIM, DIM, 0.3) is False
    monkeypatch.setattr(module.functional, "scaled_dot_product_attention", real_sdpa)
    assert probe(torch.float32, torch.device("cpu"), HEADS, KV_HEADS, DIM, DIM, 0.3) is \
        module.batched_decode_is_exact(torch.float32, torch.device("cpu"), HEADS, KV_HEADS, DIM, DIM, 0.3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_lone_decode_step_gets_the_bits_of_transformers_sdpa(dtype):
    """A lone unpadded sequence's decode step is what transformers' sdpa computes for it (no mask,
    grouped-query heads), so per-sequence stages give a lone request the unsplit model's tokens.
    Every cache length is checked: a call of another shape (heads as queries) matches at most
    lengths but not all, which is enough to move a lone request's greedy tokens."""
    differing = []
    for kv_len in range(1, 200):
        q, k, v = random_qkv(1, 1, kv_len, dtype, seed=kv_len)
        want, _ = sdpa_attention_forward(FakeAttention(), q, k, v, None, scaling=0.125)
        got, _ = per_sequence_attention(FakeAttention(), q, k, v, None, scaling=0.125)
        if not torch.equal(got, want):
            differing.append(kv_len)
    assert differing == []

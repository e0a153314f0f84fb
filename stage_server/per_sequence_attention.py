"""Attention run one sequence at a time on that sequence's own keys, so its numbers do not
depend on the batch it shares.

Owns: the `layerline_per_sequence` attention implementation (registered with transformers,
with the stock boolean `sdpa` masks) and the choice of when a stage uses it.

Why: a batch of sequences of different lengths is left-padded and masked. Stock `sdpa` then
runs one masked kernel over the padded keys, and a sequence alone runs an unmasked one over
its own keys; the two sum in different orders. In float32 the difference stays below what
moves a greedy token, in bfloat16 it does not (SmolLM2, 16 chat prompts batched: 7 of 16
answers matched the same prompt alone). Here every sequence's attention is the same call,
with the same shapes, whether it runs alone or in a batch of 64: its padding is sliced off,
and what remains has the shape it has alone. The linear layers around it are already
independent of the batch for bfloat16 on CPU (each row's dot products are summed the same
way whatever the number of rows), so a sequence's whole step is.

Does not own: the masks (transformers builds them), how prompts are grouped into prefills
(the coordinator keeps a batched prompt in one piece, as it is alone: coordinator/running_batch.py).
"""

from __future__ import annotations

import functools

import torch
from torch.nn import functional
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "layerline_per_sequence"
CHOICES = ("auto", "per-sequence", "batched")
IMPLEMENTATIONS = {"per-sequence": NAME, "batched": "sdpa"}  # mode → transformers' attn_implementation


def mode_for(choice: str, dtype: torch.dtype, device: torch.device | str = "cpu") -> str:
    """The mode ("per-sequence" or "batched") a stage uses for `--attention CHOICE`.

    auto: per-sequence for 16-bit dtypes on CPU (where batched rounding changes answers and the
    linear layers are already independent of the batch), stock batched sdpa otherwise: float32
    (batched answers have matched alone in all our runs, so per-sequence calls would only add
    their cost: 0–7 % at 16–64 clients, bench/attention_modes.py) and GPUs (one call per
    sequence would cost a kernel launch each, and cuBLAS picks its kernels by the number of
    rows, so attention alone would not make a row's bits its own).
    """
    if choice not in CHOICES:
        raise ValueError(f"attention must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice != "auto":
        return choice
    on_cpu = torch.device(device).type == "cpu"
    return "per-sequence" if on_cpu and dtype in (torch.float16, torch.bfloat16) else "batched"


def register() -> None:
    """Make `NAME` known to transformers (idempotent)."""
    AttentionInterface.register(NAME, per_sequence_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


# (mask, first keys, attended counts) of the last mask seen: a step's layers share one mask
# object, so its per-row facts are worked out once per step, not once per layer. One tuple,
# replaced whole, so threads that step different sessions never read a mix of two masks.
_last_mask_rows: tuple | None = None


def _rows_of(mask: torch.Tensor) -> tuple[list[int], list[int], list[bool]]:
    """For each row: the first key any of its queries attends, how many keys its last query
    attends, and whether every key from the first on is attended by some query (padding only
    on the left, which is all the coordinator makes; a row with holes is run from its mask)."""
    global _last_mask_rows
    last = _last_mask_rows
    if last is not None and last[0] is mask:
        return last[1:]
    seen = mask[:, 0].any(dim=1)  # [B, K]
    keys = seen.shape[1]
    first = torch.where(seen.any(dim=1), seen.to(torch.uint8).argmax(dim=1), keys).tolist()
    solid = [start + count == keys for start, count in zip(first, seen.sum(dim=1).tolist())]
    attended = mask[:, 0, -1, :].sum(dim=-1).tolist()
    _last_mask_rows = (mask, first, attended, solid)
    return first, attended, solid


def _stock_is_needed(module, query, key, attention_mask, dropout, is_causal, window, kwargs) -> bool:
    """Inputs this module leaves to transformers' sdpa: features it does not implement, and
    shapes a stage with dynamic caches never sends (no mask with queries after cached keys)."""
    if dropout or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None \
            or kwargs.get("s_aux") is not None or kwargs.get("output_attentions"):
        return True
    if is_causal is False or (is_causal is None and getattr(module, "is_causal", True) is False):
        return True
    if attention_mask is None:
        q_len, kv_len = query.shape[2], key.shape[2]
        return q_len not in (1, kv_len) or (q_len > 1 and window is not None and kv_len > window)
    return attention_mask.dtype != torch.bool


def per_sequence_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """Same contract as transformers' sdpa_attention_forward: returns ([B, Q, H, D], None)."""
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    if _stock_is_needed(module, query, key, attention_mask, dropout, is_causal, window, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    batch, heads, q_len, _ = query.shape
    kv_len = key.shape[2]
    groups = heads // key.shape[1]
    if batch == 1 and attention_mask is None:
        # A lone unpadded sequence (the common single-request step): the calls of the loop below
        # for its one row, without building a zeroed output and copying into it.
        o = functional.scaled_dot_product_attention(query, key, value, is_causal=q_len > 1, scale=scaling,
                                                    enable_gqa=groups > 1)
        return o.transpose(1, 2).contiguous(), None
    if attention_mask is not None and attention_mask.shape[0] != batch:  # one mask for every row
        attention_mask = attention_mask.expand(batch, -1, -1, -1)
    if attention_mask is None:
        first_key, attended, solid = [0] * batch, [kv_len] * batch, [True] * batch
    else:
        first_key, attended, solid = _rows_of(attention_mask)
    out = query.new_zeros(batch, q_len, heads, value.shape[-1])
    grouped = _decode_rows_by_length(query, key, value, first_key, attended, groups, scaling, out) \
        if q_len == 1 and batch > 1 else frozenset()
    for row in range(batch):
        if row in grouped:
            continue
        lead = first_key[row]
        kept = kv_len - lead
        first_query = max(0, q_len - kept)  # the queries before it are the row's left padding
        queries = q_len - first_query
        if queries <= 0:
            continue
        q = query[row:row + 1, :, first_query:]
        k, v = key[row:row + 1, :, lead:], value[row:row + 1, :, lead:]
        if queries == 1 and attended[row] == kept:
            # One query that sees all its keys: the very call transformers' sdpa makes for a lone
            # unpadded sequence (no mask, grouped-query heads), so a lone request gets its bits.
            o = functional.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=groups > 1)
        elif queries == kept and solid[row] and (window is None or kept <= window):
            # The whole row in this step, plain causal (a window longer than the row cuts nothing).
            o = functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling,
                                                        enable_gqa=groups > 1)
        else:  # queries after cached keys, a window that cuts, or holes: the row's own mask
            mask = attention_mask[row:row + 1, :, first_query:, lead:]
            o = functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling,
                                                        enable_gqa=groups > 1)
        out[row, first_query:] = o[0].transpose(0, 1)
    return out, None


def _decode_rows_by_length(query, key, value, first_key: list[int], attended: list[int], groups: int,
                           scaling: float | None, out: torch.Tensor) -> frozenset[int]:
    """Decode rows (one query each, seeing all their keys) whose keys start at the same position
    hold the same number of keys: they take one unmasked call together instead of one each, where
    this machine's kernels give each row of such a call the bits of its call alone
    (`batched_decode_is_exact`). Writes their outputs into `out` and returns which rows it did."""
    if not batched_decode_is_exact(query.dtype, query.device, query.shape[1], key.shape[1], query.shape[-1],
                                   value.shape[-1], scaling):
        return frozenset()
    kv_len = key.shape[2]
    by_lead: dict[int, list[int]] = {}
    for row, lead in enumerate(first_key):
        if lead < kv_len and attended[row] == kv_len - lead:
            by_lead.setdefault(lead, []).append(row)
    done: list[int] = []
    for lead, rows in by_lead.items():
        if len(rows) < 2:
            continue
        index = torch.tensor(rows, device=query.device)
        q = query.index_select(0, index)  # [n, heads, 1, D]
        k = key.index_select(0, index)[:, :, lead:]
        v = value.index_select(0, index)[:, :, lead:]
        o = functional.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=groups > 1)
        out[index] = o.transpose(1, 2)
        done += rows
    return frozenset(done)


# Row counts and key lengths the probe tries: a few of each size class the kernels may block by.
PROBE_ROWS = (2, 3, 4, 8, 9, 16, 17)
PROBE_KEYS = (1, 16, 33, 130)


@functools.cache
def batched_decode_is_exact(dtype: torch.dtype, device: torch.device, heads: int, kv_heads: int, dim: int,
                            value_dim: int, scaling: float | None) -> bool:
    """Whether one unmasked sdpa call over several decode rows gives every row exactly the bits
    of the same call on that row alone, on this machine's kernels, for these head shapes.

    Why probed: the kernels may split a batched call's work differently from a lone row's (on an
    AMD EPYC with AVX2 only, float32 rows of a batched call differed from alone by 1 ulp), so
    grouping rows is only safe where the machine shows it is. Probed once per shape, on the
    first decode step that could group rows."""
    generator = torch.Generator().manual_seed(0)
    for keys in PROBE_KEYS:
        rows = PROBE_ROWS[-1]
        q = torch.randn(rows, heads, 1, dim, generator=generator).to(dtype).to(device)
        k = torch.randn(rows, kv_heads, keys, dim, generator=generator).to(dtype).to(device)
        v = torch.randn(rows, kv_heads, keys, value_dim, generator=generator).to(dtype).to(device)
        gqa = heads != kv_heads
        with torch.inference_mode():
            alone = torch.cat([functional.scaled_dot_product_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1],
                                                                       scale=scaling, enable_gqa=gqa)
                               for i in range(rows)])
            for count in PROBE_ROWS:
                together = functional.scaled_dot_product_attention(q[:count], k[:count], v[:count], scale=scaling,
                                                                   enable_gqa=gqa)
                if not torch.equal(together, alone[:count]):
                    return False
    return True

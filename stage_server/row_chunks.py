"""Linear layers that give each row of a batched decode step the bits it gets alone.

Owns: probing, for each linear layer shape of a loaded slice, the most rows one product may hold
and still give every row exactly what a one-row product gives it on this machine's kernels; and
making those layers compute decode-shaped inputs with more rows in chunks of that many. Does not
own: attention (per_sequence_attention.py does the same for it) or whether a stage wants this
(server.py installs it for stages in per-sequence mode, whose promise is that a sequence's
tokens do not depend on its batch).

Why: CPU kernels may pick their blocking by the number of rows. On an Intel Xeon with AMX,
oneDNN's bfloat16 products give bit-identical rows for 1 to 32 rows and different ones from 48
rows on (SmolLM2's MLP, 576 -> 1536), so unchunked, a sequence decoding beside 47 others gets other
logits than alone and greedy answers drift (8/16 identical to alone at 16 clients). Prefills of
several prompts together (8 x 30 rows) differ too, so the coordinator prefills such stages one
prompt at a time. On an AMD EPYC without bf16 units every row count tried matches.

Only decode-shaped inputs are cut ([B, 1, D] or [B, D] rows): a prompt of L tokens is one product
of L rows both alone and in a batch (it is prefilled alone), and cutting it would change its bits
against the unsplit model's own prefill.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional

# Row counts tried, in this order, against one row at a time: every count, since a chunked step's
# last chunk may hold any number of rows up to the limit.
PROBE_ROWS = tuple(range(2, 129))


def invariant_rows(weight: torch.Tensor, bias: torch.Tensor | None) -> int:
    """The largest row count up to which every count in PROBE_ROWS gives each row the bits it gets
    alone (1 when even two rows differ); the last entry means "as many as tried"."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(PROBE_ROWS[-1], weight.shape[1], generator=generator).to(weight.dtype).to(weight.device)
    with torch.inference_mode():
        alone = torch.cat([functional.linear(rows[i:i + 1], weight, bias) for i in range(len(rows))])
        best = 1
        for count in PROBE_ROWS:
            together = functional.linear(rows[:count], weight, bias)
            if not torch.equal(together, alone[:count]):
                break
            best = count
    return best


def _chunked_forward(linear: nn.Linear, limit: int, hidden: torch.Tensor) -> torch.Tensor:
    decode_shaped = hidden.dim() == 2 or (hidden.dim() == 3 and hidden.shape[1] == 1)
    rows = hidden.numel() // hidden.shape[-1]
    if not decode_shaped or rows <= limit:
        return functional.linear(hidden, linear.weight, linear.bias)
    flat = hidden.reshape(rows, hidden.shape[-1])
    parts = [functional.linear(part, linear.weight, linear.bias) for part in flat.split(limit)]
    return torch.cat(parts).reshape(*hidden.shape[:-1], -1)


def install_row_chunks(model: nn.Module) -> dict[tuple[int, int], int]:
    """Probe each linear layer shape of `model` and make layers whose products change with the row
    count compute decode steps in chunks they keep exact. Returns {(in, out): rows per product} for
    the shapes that got chunks (empty: every probed count was exact)."""
    limits: dict[tuple, int] = {}
    chunked: dict[tuple[int, int], int] = {}
    for module in model.modules():
        if type(module) is not nn.Linear or module.weight.device.type == "meta":
            continue
        key = (module.in_features, module.out_features, module.bias is not None, module.weight.dtype)
        if key not in limits:
            limits[key] = invariant_rows(module.weight, module.bias)
        if limits[key] < PROBE_ROWS[-1]:
            module.forward = functools.partial(_chunked_forward, module, limits[key])
            chunked[(module.in_features, module.out_features)] = limits[key]
    return chunked

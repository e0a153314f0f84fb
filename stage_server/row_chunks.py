"""Linear layers that give each row of a batched decode step the bits it gets alone.

Owns: probing, for each linear layer shape of a loaded slice, the most rows one product may hold
and still give every row exactly what a one-row product gives it on this machine's kernels; and
making those layers compute decode-shaped inputs with more rows in chunks of that many. Does not
own: attention (per_sequence_attention.py does the same for it) or whether a stage wants this
(server.py installs it for stages in per-sequence mode, whose promise is that a sequence's
tokens do not depend on its batch).

Why: CPU kernels may pick their blocking by the number of rows. On an Intel Xeon with AMX,
oneDNN's bfloat16 products give bit-identical rows for 1 to 32 rows and different ones from 33
rows on (every linear shape of SmolLM2, the LM head included), so unchunked, a sequence decoding
beside 47 others gets other logits than alone and greedy answers drift (8/16 identical to alone
at 16 clients). Prefills of several prompts together (8 x 30 rows) differ too, so the
coordinator prefills such stages one prompt at a time. On an AMD EPYC without bf16 units every
row count tried matches. The probe does not read the layer's weights: it builds operands of the
same shape whose products expose any change in the order of a kernel's additions
(_probe_operands says why random ones do not).

Only decode-shaped inputs are cut ([B, 1, D] or [B, D] rows): a prompt of L tokens is one product
of L rows both alone and in a batch (it is prefilled alone), and cutting it would change its bits
against the unsplit model's own prefill.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.nn import functional

# Row counts tried, in this order, against one row at a time: every count, since a chunked step's
# last chunk may hold any number of rows up to the limit.
PROBE_ROWS = tuple(range(2, 129))
# The probe's large terms are about this many times its small ones (see _probe_operands).
BIG_OVER_SMALL = 2.0 ** 18


def _probe_operands(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight of `weight`'s shape, dtype, device and layout, and PROBE_ROWS[-1] input rows, whose
    products show any change in how a kernel orders or groups its additions.

    Why not the layer's own weight and random rows: a product summed in another order mostly rounds
    to the same bfloat16 bits, so random rows pass or fail by chance: with SmolLM2's k_proj weights
    (576 -> 192) they pass anywhere from 32 to 128 rows on a kernel whose sums change from 33 rows
    on, and a slice whose first layer of that shape passes 128 runs 64-row decode steps unchunked,
    where greedy answers drift from those alone.
    Here every input row holds large terms of opposite signs, +big and -big in equal numbers, that
    meet weight columns of ones: they cancel exactly, so each output is the sum of the small terms
    alone, and a kernel that adds the small terms between the large ones rounds them at the large
    terms' precision, in its own order. A sum taken in any other order or grouping then differs in
    its low bits, far above the output's rounding. The bits depend only on the kernel's choices,
    which depend on the shapes, dtype and layout, not on the weight's values."""
    out_features, in_features = weight.shape
    generator = torch.Generator().manual_seed(0)
    big = 2.0 ** min(20, int(math.log2(torch.finfo(weight.dtype).max)) // 2)  # float16: 2**8, so sums stay finite
    # The layer's layout (strides), which the kernel's choice may follow; one weight-sized tensor.
    probe_weight = torch.empty_like(weight, device="cpu").normal_(generator=generator)
    rows = torch.randn(PROBE_ROWS[-1], in_features, generator=generator) * (big / BIG_OVER_SMALL)
    pairs = min(in_features // 2, max(1, in_features // 16))
    columns = torch.randperm(in_features, generator=generator)[:2 * pairs]
    probe_weight[:, columns] = 1.0
    # Each row: +big in half of the columns and -big in the other half, shuffled row by row.
    order = torch.rand(len(rows), 2 * pairs, generator=generator).argsort(dim=1)
    rows[:, columns] = torch.where(order < pairs, big, -big)
    return probe_weight.to(weight.device), rows.to(weight.dtype).to(weight.device)


def invariant_rows(weight: torch.Tensor, bias: torch.Tensor | None) -> int:
    """The largest row count up to which every count in PROBE_ROWS gives each row the bits it gets
    alone (1 when even two rows differ), for products with `weight`'s shape, dtype and layout; the
    last entry means "as many as tried"."""
    probe_weight, rows = _probe_operands(weight)
    with torch.inference_mode():
        alone = torch.cat([functional.linear(rows[i:i + 1], probe_weight, bias) for i in range(len(rows))])
        best = 1
        for count in PROBE_ROWS:
            together = functional.linear(rows[:count], probe_weight, bias)
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

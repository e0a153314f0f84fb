"""Linear layers that give each row of a batched decode step the bits it gets alone (stage_server/row_chunks.py).

On CPUs whose kernels block by row count (bfloat16 on AMX) the probe finds a limit below the
largest count it tries and the stage chunks decode steps; elsewhere nothing changes. These tests
force a small limit so that they check the chunking on any machine.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional

from stage_server import row_chunks
from stage_server.row_chunks import PROBE_ROWS, install_row_chunks, invariant_rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_probe_returns_a_count_it_tried_whose_rows_match_alone(dtype):
    torch.manual_seed(0)
    linear = nn.Linear(96, 200).to(dtype)
    limit = invariant_rows(linear.weight, linear.bias)
    assert limit == 1 or limit in PROBE_ROWS
    rows = torch.randn(limit, 96).to(dtype)
    with torch.inference_mode():
        alone = torch.cat([linear(rows[i:i + 1]) for i in range(limit)])
        assert torch.equal(linear(rows), alone)


def test_the_probe_stops_at_the_first_count_whose_rows_differ(monkeypatch):
    weight = torch.randn(8, 4)

    def linear_that_changes_from_five_rows(x, w, b=None):
        out = (x.unsqueeze(1) * w).sum(-1)  # row by row, the same bits at any row count
        return out + 1e-3 if x.shape[0] >= 5 else out

    monkeypatch.setattr(row_chunks.functional, "linear", linear_that_changes_from_five_rows)
    assert invariant_rows(weight, None) == 4


def test_the_probe_sees_a_kernel_that_sums_in_another_order_from_some_row_count(monkeypatch):
    """Each output a float32 sum, taken backwards from five rows on: a sum moves by a rounding at
    most, which random rows mostly hide in bfloat16 (with this weight they pass 115 rows)."""

    def summing_backwards_from_five_rows(x, w, b=None):
        total = torch.zeros(x.shape[0], w.shape[0])
        for k in range(w.shape[1]) if x.shape[0] < 5 else reversed(range(w.shape[1])):
            total += x[:, k:k + 1].float() * w[:, k].float()
        return total.to(x.dtype)

    weight = (torch.randn(16, 96, generator=torch.Generator().manual_seed(0)) * 0.05).to(torch.bfloat16)
    monkeypatch.setattr(row_chunks.functional, "linear", summing_backwards_from_five_rows)
    assert invariant_rows(weight, None) == 4


def test_the_limit_holds_for_rows_the_probe_never_saw():
    """This machine's kernels, fresh rows: every count up to the limit gives each row its bits alone.
    (bfloat16 products on AMX change their sums from 33 rows on; random probe rows with this
    weight see no change up to 128.)"""
    weight = (torch.randn(192, 576, generator=torch.Generator().manual_seed(7)) * 0.05).to(torch.bfloat16)
    limit = invariant_rows(weight, None)
    generator = torch.Generator().manual_seed(123)
    with torch.inference_mode():
        for _ in range(4):
            rows = torch.randn(64, 576, generator=generator).to(torch.bfloat16)
            alone = torch.cat([functional.linear(rows[i:i + 1], weight) for i in range(len(rows))])
            for count in range(2, min(limit, len(rows)) + 1):
                assert torch.equal(functional.linear(rows[:count], weight), alone[:count]), (count, limit)


@pytest.mark.parametrize("shape", [(7, 1, 64), (7, 64), (9, 1, 64)])
def test_decode_steps_over_the_limit_are_computed_in_chunks_with_the_same_bits_as_alone(shape, monkeypatch):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 64, bias=False)).to(torch.bfloat16)
    sizes: list[int] = []
    real_linear = functional.linear

    def recording_linear(x, w, b=None):
        sizes.append(x.numel() // x.shape[-1])
        return real_linear(x, w, b)

    monkeypatch.setattr(row_chunks, "invariant_rows", lambda weight, bias: 3)
    assert install_row_chunks(model) == {(64, 48): 3, (48, 64): 3}
    monkeypatch.setattr(row_chunks.functional, "linear", recording_linear)
    hidden = torch.randn(shape).to(torch.bfloat16)
    with torch.inference_mode():
        together = model(hidden)
        sizes_together, sizes[:] = list(sizes), []
        alone = torch.cat([model(hidden[i:i + 1]) for i in range(shape[0])])
    assert torch.equal(together, alone) and together.shape == (*shape[:-1], 64)
    assert max(sizes_together) == 3 and sum(sizes_together) == 2 * shape[0]


def test_prompts_are_not_cut(monkeypatch):
    """A prefill of L tokens is one product of L rows, alone as in the unsplit model."""
    model = nn.Linear(16, 8)
    monkeypatch.setattr(row_chunks, "invariant_rows", lambda weight, bias: 2)
    install_row_chunks(model)
    sizes: list[int] = []
    real_linear = functional.linear
    monkeypatch.setattr(row_chunks.functional, "linear",
                        lambda x, w, b=None: sizes.append(x.numel() // x.shape[-1]) or real_linear(x, w, b))
    with torch.inference_mode():
        model(torch.randn(1, 12, 16))
    assert sizes == [12]


def test_layers_whose_every_tried_count_matched_stay_as_they_are(monkeypatch):
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 16))
    monkeypatch.setattr(row_chunks, "invariant_rows", lambda weight, bias: PROBE_ROWS[-1])
    assert install_row_chunks(model) == {}
    assert all("forward" not in vars(m) for m in model)

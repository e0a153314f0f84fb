"""The last stage's LM head, split across threads by vocabulary rows for small steps.

Owns: computing a small step's logits (at most SPLIT_MAX_ROWS rows, one sequence decoding or a
few) as `parts` slices of the vocabulary, each on its own thread, and joining them; and putting
itself in place of a loaded slice's head module.

Why: a decode step's head is a matrix-vector product over the whole vocabulary (SmolLM2-135M:
49152 x 576, 113 MiB in float32, ~11 ms of a ~90 ms token on a 2-core AMD EPYC VM), and there
MKL runs a float32 product with so few rows on one core whatever torch's thread count. In a
pipeline the other stages wait for this one during decode, so their cores are idle: two halves on
two threads, each reading its own rows, take 6.5-7.7 ms against 11.8 whole. On an Intel Xeon VM
MKL threads that product itself, the stage's calibration picks all threads for small steps, and
the split stands aside (below).

Exact: each logit is still one row of the weight times the hidden state, computed by the same
kernel; the vocabulary is cut at multiples of CUT_ALIGN rows, so every part's row blocks line up
with those of the whole matrix. Tests compare the joined logits bit for bit with the whole product
(float32 and bfloat16, 1-4 rows, odd vocabulary sizes), and the pipeline equivalence tests run it.

When it stands aside: steps with more rows (a batched product, which torch threads itself),
steps that torch already runs on as many threads as there are parts (bfloat16, whose products
torch's own threads split; thread_counts decides that count), and steps of groups that share
the stages with others (`alone` False: the servicer sets it per step from the chaining fields,
which the coordinator sends only to a group that has the stages to itself). There the other
cores are busy with the other groups, and a second thread only preempts them (with 4 concurrent
clients the split is ~4 % slower than the whole product). Does not own: the thread count of other
steps (thread_counts) or which module is the head (the family's layout in architectures).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from stage_server.core_share import usable_cores

SPLIT_MAX_ROWS = 4  # above it, the product is a matrix product that torch's own threads split
CUT_ALIGN = 64  # parts start at multiples of this many vocabulary rows
MAX_PARTS = 4  # memory bandwidth, not cores, bounds the gain; more parts only add hand-offs
AUTO = "auto"


def parts_for(setting: int | str) -> int:
    """How many parts the head is split into for a `--head-threads` setting (1 = not split)."""
    if setting == AUTO:
        return max(1, min(usable_cores(), MAX_PARTS))
    if not isinstance(setting, int) or setting < 1:
        raise ValueError(f"head threads must be >= 1 or 'auto', got {setting!r}")
    return setting


def vocabulary_cuts(vocab: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) row ranges of `parts` nearly equal slices, cut at multiples of CUT_ALIGN rows.
    Fewer ranges when the vocabulary is too small to give every part a whole block."""
    blocks = -(-vocab // CUT_ALIGN)
    parts = max(1, min(parts, blocks))
    edges = [min(vocab, round(blocks * index / parts) * CUT_ALIGN) for index in range(parts + 1)]
    return [(start, end) for start, end in zip(edges, edges[1:], strict=False) if end > start]


class SplitHead(nn.Module):
    """Wraps the head's nn.Linear: small steps in parts on threads, everything else unchanged."""

    def __init__(self, linear: nn.Linear, parts: int) -> None:
        super().__init__()
        self.linear = linear
        self.cuts = vocabulary_cuts(linear.out_features, parts)
        self._pool = ThreadPoolExecutor(len(self.cuts) - 1, thread_name_prefix="head-part",
                                        initializer=_one_torch_thread) if len(self.cuts) > 1 else None
        self.split_steps = 0  # steps computed in parts (Info and tests read it)
        self.alone = True  # the step's group has the stages to itself (set per step by the servicer)
        self._lock = threading.Lock()  # one split step at a time: the pool has one thread per part

    @property
    def weight(self) -> torch.Tensor:  # what Hugging Face code and the loader look up on a head
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    def splits(self, hidden: torch.Tensor) -> bool:
        rows = hidden.numel() // max(1, hidden.shape[-1])
        return (self._pool is not None and self.alone and rows <= SPLIT_MAX_ROWS and hidden.device.type == "cpu"
                and torch.get_num_threads() < len(self.cuts))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.splits(hidden):
            return self.linear(hidden)
        weight, bias = self.linear.weight, self.linear.bias

        def part(bounds: tuple[int, int]) -> torch.Tensor:
            start, end = bounds
            with torch.inference_mode():
                return nn.functional.linear(hidden, weight[start:end], None if bias is None else bias[start:end])

        with self._lock:
            others = [self._pool.submit(part, bounds) for bounds in self.cuts[1:]]
            first = part(self.cuts[0])
            logits = torch.cat([first, *(future.result() for future in others)], dim=-1)
            self.split_steps += 1
        return logits

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


def _one_torch_thread() -> None:
    """Each part's thread computes on one torch thread. Left at torch's default (all cores), a part's
    thread gets a GNU OpenMP team of its own on its first product, beside the compute thread's: more
    OpenMP threads than cores, so libgomp stops spinning and every later all-thread step of the
    stage sleeps between parallel regions (28 ms a step instead of 17, SmolLM2 float32 on a 2-thread
    Intel Xeon VM; compute_thread.py explains). torch's thread count is per thread: the compute
    thread keeps its own."""
    torch.set_num_threads(1)


def install_split_head(model: nn.Module, head_name: str, parts: int) -> SplitHead | None:
    """Put a SplitHead in place of `model`'s head module `head_name` ("lm_head"); returns it, or
    None when `parts` is 1 or the head is not a plain nn.Linear on the CPU."""
    owner_name, _, attr = head_name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    head = getattr(owner, attr, None)
    if parts < 2 or type(head) is not nn.Linear or head.weight.device.type != "cpu":
        return None
    split = SplitHead(head, parts)
    if split._pool is None:
        return None
    setattr(owner, attr, split)
    return split

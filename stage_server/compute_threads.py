"""How many CPU threads each forward step of a stage runs on.

Owns: the choice, per step, between the stage's full thread count and a smaller one for small
steps, and applying it to torch. Does not own: running the step (stage_model) or locking (the
servicer runs one step at a time under its compute lock, which is what makes a process-wide
setting safe here).

Why small steps get fewer threads: a step of a few tokens (one sequence decoding) reads every
weight of the slice once and does little arithmetic per byte, so it is bound by memory bandwidth;
on SmolLM2-135M a second thread does not speed it up at all (and slows it when stages share
cores: their thread teams fight over the cores as the token passes from stage to stage). Prefill
and batched decode do enough arithmetic per weight for more threads to pay (1.3x at 16-64 rows,
1.9x for a 512-token prompt on two cores). Measured through 4 local stages sharing 2 cores,
interleaved runs: single-sequence decode went from 0.82 to 0.91 of the unsplit model's tokens/s.

Thread counts must not change results, or greedy answers would drift from the unsplit model's:
torch's CPU kernels here give bit-identical logits for 1 and 2 threads (SmolLM2, float32 and
bfloat16, decode and prefill shapes), and the equivalence tests run stages under this policy
against the unsplit model at full threads.
"""

from __future__ import annotations

import torch

# Steps carrying at most this many new tokens in total (rows x tokens) count as small.
SMALL_STEP_TOKENS = 4


class ComputeThreads:
    """`for_step(tokens)` sets torch's intra-op threads for a step of `tokens` new tokens."""

    def __init__(self, full: int = 0, small_step: int = 1) -> None:
        if full < 0 or small_step < 0:
            raise ValueError(f"thread counts must be >= 0, got {full} and {small_step}")
        self.full = full or torch.get_num_threads()
        self.small_step = min(small_step or self.full, self.full)

    def threads_for(self, tokens: int) -> int:
        return self.small_step if tokens <= SMALL_STEP_TOKENS else self.full

    def for_step(self, tokens: int) -> int:
        """Apply the thread count for a step of `tokens` new tokens; returns it."""
        threads = self.threads_for(tokens)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return threads

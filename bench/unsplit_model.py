"""The unsplit baseline: the whole model in this process, run with Hugging Face `generate`.

Owns: loading the model once per dtype and device, and its figures (decode tokens/s between the
first and the last token, time to first token, a static batch's tokens/s). Does not own: pinning
to cores (pinned_cores.py) or the pipeline it is compared with (local_pipeline.py).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.running_batch import left_padded  # noqa: E402
from coordinator.text import Tokenization  # noqa: E402


class Unsplit:
    """The whole model in this process, run with `generate` (greedy, no early stop)."""

    def __init__(self, model_dir: Path, dtype: torch.dtype, tokenization: Tokenization, device: str = "cpu") -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        self.pad, self.device = tokenization.pad_token_id, device

    def _generate(self, rows: list[list[int]], new_tokens: int, streamer=None) -> torch.Tensor:
        ids, mask = left_padded(rows, self.pad)
        longest = ids.shape[1]
        with torch.inference_mode():
            # .cpu(): a GPU's work counts only once it is done (the pipeline's answers come back as numbers)
            return self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                       max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                       pad_token_id=self.pad, streamer=streamer)[:, longest:].cpu()

    def decode_tokens_per_s(self, prompt: list[int], new_tokens: int) -> float:
        """Tokens/s between the first and the last generated token (prefill excluded)."""
        stamps: list[float] = []

        class Stamps:
            def put(self, value):
                value.tolist()  # waits for a GPU to finish the token (a no-op on the CPU)
                stamps.append(time.perf_counter())

            def end(self):
                pass

        self._generate([prompt], new_tokens, Stamps())
        # the streamer sees the prompt once, then one call per new token
        return (new_tokens - 1) / (stamps[-1] - stamps[1])

    def first_token_s(self, prompt: list[int]) -> float:
        started = time.perf_counter()
        self._generate([prompt], 1)
        return time.perf_counter() - started

    def batch_tokens_per_s(self, prompts: list[list[int]], new_tokens: int) -> float:
        started = time.perf_counter()
        out = self._generate(prompts, new_tokens)
        return out.numel() / (time.perf_counter() - started)

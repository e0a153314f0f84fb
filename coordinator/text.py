"""Text ⇄ tokens for the coordinator: prompts, chat templates, streaming detokenization, stop strings.

Owns: the tokenizer (the only model file the coordinator reads), rendering chat
messages with the model's chat template, and turning a growing list of generated
ids into text deltas that never split a character or leak a stop string.

Does not own: generation (engine) or the API (service).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

REPLACEMENT_CHAR = "\ufffd"  # what a tokenizer shows for half of a multi-byte character


class Tokenization:
    """The model's tokenizer plus what generation needs from it."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_token_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(int(i) for i in eos_token_ids)
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else (min(self.eos_token_ids) if self.eos_token_ids else 0)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> Tokenization:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        eos: list[int] = []
        try:
            generation = GenerationConfig.from_pretrained(model_dir)
            declared = generation.eos_token_id
            if isinstance(declared, (list, tuple)):
                eos = list(declared)
            elif declared is not None:
                eos = [declared]
        except OSError:
            pass
        if not eos and tokenizer.eos_token_id is not None:
            eos = [tokenizer.eos_token_id]
        return cls(tokenizer, eos)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode_prompt(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Render messages with the chat template, ready for the assistant's answer."""
        if not self.has_chat_template:
            raise ValueError("this model's tokenizer has no chat template; send `prompt` instead of `messages`")
        rendered = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)


class TextStream:
    """Follows one sequence's tokens and releases text only when it is final.

    Text is held back while it ends in half a character, or in something that could
    still grow into a stop string. Once a stop string appears, the text is cut just
    before it and `stopped` becomes True.
    """

    def __init__(self, tokenization: Tokenization, stop: Sequence[str] = ()) -> None:
        self._tokenization = tokenization
        self._stop = [s for s in stop if s]
        self.token_ids: list[int] = []
        self.text = ""  # final text so far (stop string excluded)
        self._released = 0
        self.stopped = False

    def add(self, token_id: int) -> bool:
        """Take one token; True when a stop string has appeared."""
        self.token_ids.append(token_id)
        text = self._tokenization.decode(self.token_ids)
        cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
        else:
            self.text = text
        return self.stopped

    def release(self, final: bool = False) -> str:
        """Text not yet released that cannot change any more."""
        end = len(self.text)
        if not final and not self.stopped:
            while end > self._released and self.text[end - 1] == REPLACEMENT_CHAR:
                end -= 1
            end -= self._held_for_stop(self.text[:end])
        delta = self.text[self._released:end]
        self._released = max(self._released, end)
        return delta

    def _held_for_stop(self, text: str) -> int:
        """Length of the longest suffix of `text` that begins some stop string."""
        longest = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

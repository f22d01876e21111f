"""Text-image pairs as single-turn conversations: the caption asks, `<boi> visual tokens <eoi>` answers.

With a chat template (SmolLM2-Instruct, LLaMA-2-chat, ...) the prompt is the template rendered for
the user's caption up to the assistant header, and the response is followed by what the template
closes an assistant turn with (e.g. `<|im_end|>\\n`). Without one, the prompt is the caption's own
ids and the response ends with the tokenizer's end-of-sequence token. The template is split once,
around a placeholder answer, so every example costs one tokenisation of its caption.

Training examples are fixed-length: inputs = tokens[:-1], targets = tokens[1:], and the loss mask
is 1 exactly on the targets inside the response (the markers, the visual ids and the closing
tokens), so the model is never trained to write captions.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from v2flow_jax.lm.visual_vocab import VisualVocab

_PLACEHOLDER = "\u2063IMAGE\u2063"   # invisible separators: no caption or template contains this


@dataclasses.dataclass
class ChatFormat:
    """Turns captions and code sequences into token ids for one text tokenizer and visual vocabulary."""
    tokenizer: object
    vocab: VisualVocab
    system: str | None = None       # an optional system message; None: the template's own default

    def __post_init__(self):
        self.templated = bool(getattr(self.tokenizer, "chat_template", None))
        if self.templated:
            full = self._render("a caption", answer=True)
            head, sep, tail = full.rpartition(_PLACEHOLDER)
            if not sep:
                raise ValueError("the chat template dropped the assistant's answer; it cannot frame a response.")
            self._suffix = self._ids(tail)
        else:
            eos = getattr(self.tokenizer, "eos_token_id", None)
            self._suffix = [] if eos is None else [int(eos)]

    def _messages(self, caption: str):
        messages = [] if self.system is None else [{"role": "system", "content": self.system}]
        return messages + [{"role": "user", "content": caption}]

    def _render(self, caption: str, answer: bool = False) -> str:
        messages = self._messages(caption)
        if answer:
            messages = messages + [{"role": "assistant", "content": _PLACEHOLDER}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=not answer)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, caption: str) -> list[int]:
        """Token ids up to where the response begins (the empty caption: the guidance prompt)."""
        if self.templated:
            return self._ids(self._render(caption))
        ids = list(self.tokenizer(caption)["input_ids"])      # with the tokenizer's BOS, if it adds one
        return ids if ids else [int(self.tokenizer.bos_token_id or 0)]

    def response_ids(self, codes) -> list[int]:
        """<boi>, the visual ids of `codes`, <eoi>, then the template's end of turn."""
        visual = [int(c) + self.vocab.first_visual for c in np.asarray(codes).reshape(-1)]
        return [self.vocab.boi, *visual, self.vocab.eoi, *self._suffix]

    def response_length(self, num_codes: int) -> int:
        return num_codes + 2 + len(self._suffix)

    def example(self, caption: str, codes, length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
        """One training example of `length` positions: inputs, targets, loss_mask (float32).

        A caption too long for `length` loses tokens from its end (the response always fits whole;
        if it cannot, the error says how long `length` must be).
        """
        response = self.response_ids(codes)
        budget = length + 1 - len(response)
        prompt = self.prompt_ids(caption)
        if len(prompt) > budget:
            prompt = self._shortened_prompt(caption, budget, len(response))
        tokens = np.full(length + 1, pad_id, np.int32)
        tokens[:len(prompt)] = prompt
        tokens[len(prompt):len(prompt) + len(response)] = response
        mask = np.zeros(length, np.float32)
        mask[len(prompt) - 1:len(prompt) - 1 + len(response)] = 1.0   # targets[i] = tokens[i + 1]
        return {"inputs": tokens[:-1], "targets": tokens[1:], "loss_mask": mask}

    def _shortened_prompt(self, caption: str, budget: int, response_len: int) -> list[int]:
        words = self._ids(caption)
        overhead = len(self.prompt_ids("")) if self.templated else 0
        keep = budget - overhead
        if keep < 0:
            raise ValueError(f"sequence length too short: the response alone takes {response_len} positions and the "
                             f"prompt frame {overhead}; set --config.llm.seq_len to at least "
                             f"{response_len + overhead + 8}.")
        while keep >= 0:   # a decoded prefix can re-tokenise a little longer: shrink until it fits
            prompt = self.prompt_ids(self.tokenizer.decode(words[:keep]))
            if len(prompt) <= budget:
                return prompt
            keep -= 1
        raise ValueError(f"cannot fit any of the caption {caption[:40]!r} in {budget} prompt positions.")


def drop_caption(caption: str, rng: np.random.Generator, fraction: float) -> str:
    """The empty caption with probability `fraction` (what classifier-free guidance learns from)."""
    return "" if fraction > 0 and rng.random() < fraction else caption

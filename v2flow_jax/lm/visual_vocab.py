"""Where the visual tokens sit in an extended LLM vocabulary.

The extended vocabulary is the LLM's own rows, then one row per tokenizer code, then the two image
markers:  [0, text_size) text | [text_size, text_size + num_visual) visual code k at text_size + k |
<boi> | <eoi>. Appending keeps every text id (and the text logits) where they were.
"""
from __future__ import annotations

import dataclasses

BOI = "<boi>"
EOI = "<eoi>"


def visual_token_name(code: int) -> str:
    """The tokenizer-side spelling of visual code `code` (what the `transformers` tokenizer learns)."""
    return f"<v{code}>"


@dataclasses.dataclass(frozen=True)
class VisualVocab:
    text_size: int          # rows of the original LLM vocabulary (embedding table rows, not len(tokenizer))
    num_visual: int         # the tokenizer's codebook size N_v

    def __post_init__(self):
        if self.text_size < 1 or self.num_visual < 1:
            raise ValueError(f"VisualVocab needs text_size >= 1 and num_visual >= 1, got {self}.")

    @property
    def first_visual(self) -> int:
        return self.text_size

    @property
    def boi(self) -> int:
        return self.text_size + self.num_visual

    @property
    def eoi(self) -> int:
        return self.boi + 1

    @property
    def size(self) -> int:
        """Rows of the extended embedding table."""
        return self.eoi + 1

    def to_ids(self, codes):
        """Tokenizer codes (any int array) -> extended-vocabulary ids."""
        return codes + self.first_visual

    def to_codes(self, ids):
        """Extended-vocabulary ids of visual tokens -> tokenizer codes (no check; see `is_visual`)."""
        return ids - self.first_visual

    def is_visual(self, ids):
        return (ids >= self.first_visual) & (ids < self.boi)

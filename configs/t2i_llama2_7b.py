r"""Text-to-image on LLaMA-2-7B: the paper's LLM stage (V2Flow section 2.4).

Run (Cloud TPU v5p-128 or 32+ H100 80 GB: 7B parameters, Adam states in fp32 = ~112 GB sharded over
fsdp, global batch 1024):
    python -m v2flow_jax.main --config=configs/t2i_llama2_7b.py --workdir=gs://BUCKET/v2flow/t2i_7b \
        --config.llm.checkpoint=/path/to/Llama-2-7b-hf \
        --config.llm.tokenizer_workdir=gs://BUCKET/v2flow/tok256 \
        --config.llm.records_dir=gs://BUCKET/v2flow/tok256/token_records

Before it: a tokenizer trained with this LLM's table as its vocabulary (configs/tok256.py, vocab_dim
4096), and `mode=encode_pairs` over the text-image pairs. Recipe (the paper's): Adam without weight
decay, lr 2e-5, cosine after a 3% warm-up, global batch 1024, 10 epochs; loss on the response only;
10% empty captions for classifier-free guidance (our choice: the paper does not give the fraction).
num_steps = 10 epochs: set it from your pair count (10 * pairs / 1024). Not yet run on a pod.
"""
from v2flow_jax import config_args, config_defaults


def get_config(arg: str = ""):
    args = config_args.parse(arg, pairs=1_000_000, fsdp=-1)
    c = config_defaults.base_config()
    c.mode = "finetune_llm"
    c.mesh = (("data", 1), ("fsdp", args.fsdp), ("tensor", 1))
    c.llm.update(batch_size=1024, num_steps=max(1, 10 * args.pairs // 1024), learning_rate=2e-5,
                 warmup_fraction=0.03, empty_caption_fraction=0.1, head_init="codebook", dtype="bfloat16",
                 scan_layers=True, remat_policy="dots_with_no_batch_dims_saveable", checkpoint_every=1000)
    # mode=plan (compile-only, no weights read): LLaMA-2-7B's shape, as its config.json gives it.
    c.plan.update(stage="llm", llm=dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                                        num_heads=32, num_kv_heads=32, rms_norm_eps=1e-5,
                                        max_position_embeddings=4096))
    return c

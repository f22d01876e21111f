"""The constrained decode loop: only visual tokens, exactly n, guidance, seeds, and a recomputed reference.

The model is a tiny random LLaMA whose head prefers text tokens, so an unconstrained
decoder would leave the visual range at once; the reference decodes by full recomputation of every
prefix (no cache), independently of the scan loop.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from v2flow_jax.lm import generate, llama
from v2flow_jax.lm.visual_vocab import VisualVocab

TEXT, NV, N = 40, 24, 9
VOCAB = VisualVocab(text_size=TEXT, num_visual=NV)
CONFIG = llama.LlamaConfig(vocab_size=VOCAB.size, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=4, num_kv_heads=2, dtype=jnp.float32, max_position_embeddings=128)
SETTINGS = [generate.Sampling(greedy=True), generate.Sampling(temperature=0.7),
            generate.Sampling(top_k=3), generate.Sampling(top_p=0.5, temperature=1.3),
            generate.Sampling(top_k=5, top_p=0.9, cfg_scale=3.0)]


@pytest.fixture(scope="module")
def model_params():
    params = llama.init_params(CONFIG, jax.random.key(0))
    params = jax.tree.map(lambda x: x * 5.0 if x.ndim == 2 else x, params)   # O(0.1) weights: logits differ
    # Visual columns shrunk: their logits sit near 0 while text logits spread ~ +-3, so an
    # unconstrained decoder would almost never pick a visual token.
    kernel = params["lm_head"]["kernel"]
    params["lm_head"]["kernel"] = kernel.at[:, VOCAB.first_visual:VOCAB.boi].multiply(0.1)
    return llama.Llama(CONFIG), params


def _prompts():
    rng = np.random.RandomState(0)
    lengths = np.array([5, 11, 8], np.int32)
    prompts = np.zeros((3, 12), np.int32)
    for i, n in enumerate(lengths):
        prompts[i, :n] = rng.randint(0, TEXT, n)
    uncond = np.zeros_like(prompts)
    uncond[:, :2] = [7, 9]                  # "the empty caption": the same two tokens for every row
    return jnp.asarray(prompts), jnp.asarray(lengths), jnp.asarray(uncond), jnp.full((3,), 2, jnp.int32)


def _reference_greedy(model, params, prompt, uncond=None, scale=1.0):
    """Greedy by full recomputation of the whole prefix at each step (no cache)."""
    apply = jax.jit(model.apply)
    seqs = [list(prompt) + [VOCAB.boi]] + ([list(uncond) + [VOCAB.boi]] if uncond is not None else [])
    codes = []
    for _ in range(N):
        last = [np.asarray(apply({"params": params}, jnp.asarray([s], jnp.int32)))[0, -1] for s in seqs]
        visual = [x[VOCAB.first_visual:VOCAB.boi] for x in last]
        guided = visual[1] + scale * (visual[0] - visual[1]) if uncond is not None else visual[0]
        code = int(np.argmax(guided))
        codes.append(code)
        for s in seqs:
            s.append(VOCAB.first_visual + code)
    return np.array(codes)


def test_the_model_prefers_text_unconstrained(model_params):
    model, params = model_params
    prompts, lengths, _, _ = _prompts()
    logits = model.apply({"params": params}, prompts)
    visual_share = np.asarray(VOCAB.is_visual(np.asarray(logits).argmax(-1))).mean()
    assert visual_share < 0.1   # so the constraint below is doing work


@pytest.mark.parametrize("sampling", SETTINGS, ids=str)
def test_only_visual_tokens_and_exactly_n(model_params, sampling):
    model, params = model_params
    prompts, lengths, uncond, uncond_lengths = _prompts()
    guided = sampling.cfg_scale != 1.0
    codes = generate.generate_codes(model, params, prompts, lengths, jax.random.key(1), vocab=VOCAB, num_tokens=N,
                                    sampling=sampling, uncond_prompts=uncond if guided else None,
                                    uncond_lengths=uncond_lengths if guided else None)
    codes = np.asarray(codes)
    assert codes.shape == (3, N) and codes.dtype == np.int32
    assert codes.min() >= 0 and codes.max() < NV
    response = np.asarray(generate.response_ids(jnp.asarray(codes), VOCAB))
    assert response.shape == (3, N + 2)
    assert (response[:, 0] == VOCAB.boi).all() and (response[:, -1] == VOCAB.eoi).all()
    assert np.asarray(VOCAB.is_visual(response[:, 1:-1])).all()


def test_greedy_matches_full_recomputation(model_params):
    model, params = model_params
    prompts, lengths, _, _ = _prompts()
    codes = np.asarray(generate.generate_codes(model, params, prompts, lengths, jax.random.key(0), vocab=VOCAB,
                                               num_tokens=N, sampling=generate.Sampling(greedy=True)))
    for i in range(3):
        ref = _reference_greedy(model, params, np.asarray(prompts[i, :lengths[i]]))
        np.testing.assert_array_equal(codes[i], ref)
    assert len({tuple(c) for c in codes}) > 1   # the prompts matter


def test_guided_greedy_matches_recomputation(model_params):
    model, params = model_params
    prompts, lengths, uncond, uncond_lengths = _prompts()
    codes = np.asarray(generate.generate_codes(
        model, params, prompts, lengths, jax.random.key(0), vocab=VOCAB, num_tokens=N,
        sampling=generate.Sampling(greedy=True), uncond_prompts=uncond, uncond_lengths=uncond_lengths,
        cfg_scale=4.0))
    for i in range(3):
        ref = _reference_greedy(model, params, np.asarray(prompts[i, :lengths[i]]), np.array([7, 9]), 4.0)
        np.testing.assert_array_equal(codes[i], ref)
    unguided = np.asarray(generate.generate_codes(model, params, prompts, lengths, jax.random.key(0), vocab=VOCAB,
                                                  num_tokens=N, sampling=generate.Sampling(greedy=True)))
    assert (codes != unguided).any()   # w = 4 changes the result


@pytest.mark.parametrize("greedy", [True, False])
def test_guidance_weight_one_equals_unguided(model_params, greedy):
    model, params = model_params
    prompts, lengths, uncond, uncond_lengths = _prompts()
    sampling = generate.Sampling(greedy=greedy, top_k=6)
    kw = dict(vocab=VOCAB, num_tokens=N, sampling=sampling)
    plain = generate.generate_codes(model, params, prompts, lengths, jax.random.key(5), **kw)
    w1 = generate.generate_codes(model, params, prompts, lengths, jax.random.key(5), uncond_prompts=uncond,
                                 uncond_lengths=uncond_lengths, cfg_scale=1.0, **kw)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(w1))


def test_a_seed_gives_the_same_tokens(model_params):
    model, params = model_params
    prompts, lengths, _, _ = _prompts()
    kw = dict(vocab=VOCAB, num_tokens=N, sampling=generate.Sampling(temperature=1.5))
    a = np.asarray(generate.generate_codes(model, params, prompts, lengths, jax.random.key(11), **kw))
    b = np.asarray(generate.generate_codes(model, params, prompts, lengths, jax.random.key(11), **kw))
    c = np.asarray(generate.generate_codes(model, params, prompts, lengths, jax.random.key(12), **kw))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_filter_logits_against_numpy():
    rng = np.random.RandomState(0)
    logits = rng.randn(4, 30).astype(np.float32) * 2
    out = np.asarray(generate.filter_logits(jnp.asarray(logits), top_k=0, top_p=0.6))
    for row, kept in zip(logits, out):
        order = np.argsort(-row)
        p = np.exp(row[order] - row.max())
        p /= p.sum()
        n_keep = int(np.searchsorted(np.cumsum(p), 0.6) + 1)          # fewest codes reaching 0.6
        expected = np.zeros(30, bool)
        expected[order[:n_keep]] = True
        np.testing.assert_array_equal(kept > np.finfo(np.float32).min, expected)
    top3 = np.asarray(generate.filter_logits(jnp.asarray(logits), top_k=3, top_p=1.0))
    np.testing.assert_array_equal((top3 > np.finfo(np.float32).min).sum(-1), [3, 3, 3, 3])
    tiny = np.asarray(generate.filter_logits(jnp.asarray(logits), top_k=0, top_p=1e-6))
    np.testing.assert_array_equal((tiny > np.finfo(np.float32).min).argmax(-1), logits.argmax(-1))


def test_top_k_one_is_greedy(model_params):
    model, params = model_params
    prompts, lengths, _, _ = _prompts()
    kw = dict(vocab=VOCAB, num_tokens=N)
    greedy = generate.generate_codes(model, params, prompts, lengths, jax.random.key(0),
                                     sampling=generate.Sampling(greedy=True), **kw)
    top1 = generate.generate_codes(model, params, prompts, lengths, jax.random.key(3),
                                   sampling=generate.Sampling(top_k=1, temperature=2.0), **kw)
    np.testing.assert_array_equal(np.asarray(greedy), np.asarray(top1))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="temperature"):
        generate.Sampling(temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        generate.Sampling(top_p=0.0)

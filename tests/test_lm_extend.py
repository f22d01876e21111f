"""Extending a LLaMA with visual tokens: the paper's row rule, text logits untouched, head choices, tokenizer ids."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from v2flow_jax.lm import extend, llama
from v2flow_jax.lm.visual_vocab import BOI, EOI, VisualVocab, visual_token_name

TEXT, WIDTH, NV = 50, 32, 12


def _config(tied):
    return llama.LlamaConfig(vocab_size=TEXT, hidden_size=WIDTH, intermediate_size=64, num_layers=2, num_heads=4,
                             num_kv_heads=2, dtype=jnp.float32, tie_word_embeddings=tied)


def _params(config, seed=0):
    params = llama.init_params(config, jax.random.key(seed))
    return jax.tree.map(lambda x: x * 5.0 if x.ndim == 2 else x, params)


def _codebook(seed=1):
    c = np.random.RandomState(seed).randn(NV, WIDTH).astype(np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)   # the tokenizer's cosine codebook is unit-norm


@pytest.mark.parametrize("tied", [True, False])
def test_visual_rows_are_the_codebook_and_text_logits_unchanged(tied):
    config = _config(tied)
    params, codebook = _params(config), _codebook()
    new, new_config, vocab = extend.extend_llama(params, config, codebook)
    assert new_config.vocab_size == TEXT + NV + 2 == vocab.size
    assert new_config.tie_word_embeddings == tied
    table = np.asarray(new["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(table[vocab.first_visual:vocab.boi], codebook)
    np.testing.assert_array_equal(table[:TEXT], np.asarray(params["embed_tokens"]["embedding"]))
    assert not np.allclose(table[vocab.boi], table[vocab.eoi])          # the markers are told apart

    prompt = jnp.asarray(np.random.RandomState(2).randint(0, TEXT, (2, 9)), jnp.int32)
    before = np.asarray(llama.Llama(config).apply({"params": params}, prompt))
    after = np.asarray(llama.Llama(new_config).apply({"params": extend.place_params(new)}, prompt))
    assert after.shape == (2, 9, vocab.size)
    np.testing.assert_allclose(after[..., :TEXT], before, atol=1e-5, rtol=1e-5)
    if tied:   # a tied head scores visual token k with its codebook vector
        hidden = after[..., vocab.first_visual:vocab.boi]
        assert np.abs(hidden).max() > 1e-3


@pytest.mark.parametrize("head_init", extend.HEAD_INITS)
def test_untied_head_rows(head_init):
    config = _config(False)
    params, codebook = _params(config), _codebook()
    new, _, vocab = extend.extend_llama(params, config, codebook, head_init=head_init)
    head = np.asarray(new["lm_head"]["kernel"]).T        # one row per output token
    text = np.asarray(params["lm_head"]["kernel"]).T
    np.testing.assert_array_equal(head[:TEXT], text)
    visual = head[vocab.first_visual:vocab.boi]
    expected = {"codebook": codebook, "text_mean": np.broadcast_to(text.mean(0), codebook.shape),
                "zeros": np.zeros_like(codebook)}[head_init]
    np.testing.assert_allclose(visual, expected, atol=1e-6)


def test_text_median_row_norm_keeps_directions_at_a_words_length():
    config = _config(True)
    params, codebook = _params(config), _codebook()
    new, _, vocab = extend.extend_llama(params, config, codebook, row_norm="text_median")
    table = np.asarray(new["embed_tokens"]["embedding"])
    visual = table[vocab.first_visual:vocab.boi]
    median = np.median(np.linalg.norm(np.asarray(params["embed_tokens"]["embedding"]), axis=1))
    assert abs(median - 1.0) > 0.3                                   # the test means something: not unit already
    np.testing.assert_allclose(np.linalg.norm(visual, axis=1), median, rtol=1e-5)
    np.testing.assert_allclose(visual / np.linalg.norm(visual, axis=1, keepdims=True), codebook, atol=1e-6)
    with pytest.raises(ValueError, match="visual_row_norm"):
        extend.extend_llama(params, config, codebook, row_norm="bigger")


def test_untie_makes_a_head_from_the_extended_table():
    config = _config(True)
    params, codebook = _params(config), _codebook()
    new, new_config, vocab = extend.extend_llama(params, config, codebook, head_init="zeros", untie=True)
    assert not new_config.tie_word_embeddings
    head = np.asarray(new["lm_head"]["kernel"]).T
    np.testing.assert_array_equal(head[:TEXT], np.asarray(params["embed_tokens"]["embedding"]))
    assert not head[vocab.first_visual:vocab.boi].any()


def test_errors_name_the_fix():
    config = _config(True)
    params = _params(config)
    with pytest.raises(ValueError, match="vocab_dim=32"):
        extend.extend_llama(params, config, np.zeros((NV, WIDTH + 1), np.float32))
    with pytest.raises(ValueError, match="untie=True"):
        extend.extend_llama(params, config, _codebook(), head_init="zeros")
    with pytest.raises(ValueError, match="head_init"):
        extend.extend_llama(params, config, _codebook(), head_init="mean")


def _text_tokenizer(size):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    words = {f"w{i}": i for i in range(size)}
    model = tokenizers.models.WordLevel(vocab=words, unk_token="w0")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.mark.parametrize("tokenizer_size", [TEXT, TEXT - 3])   # the same size, and a padded table
def test_text_tokenizer_ids_match_the_table(tmp_path, tokenizer_size):
    transformers = pytest.importorskip("transformers")
    vocab = VisualVocab(text_size=TEXT, num_visual=NV)
    tok = extend.extend_text_tokenizer(_text_tokenizer(tokenizer_size), vocab)
    assert len(tok) == vocab.size
    ids = tok.convert_tokens_to_ids([visual_token_name(k) for k in range(NV)] + [BOI, EOI])
    assert ids == list(range(vocab.first_visual, vocab.size))
    text = f"w3 {BOI}{visual_token_name(5)}{visual_token_name(11)}{EOI}"
    assert tok(text)["input_ids"] == [3, vocab.boi, vocab.first_visual + 5, vocab.first_visual + 11, vocab.eoi]
    tok.save_pretrained(tmp_path)       # saved with the model: the ids survive a reload
    again = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert again.convert_tokens_to_ids([visual_token_name(7), EOI]) == [vocab.first_visual + 7, vocab.eoi]
    with pytest.raises(ValueError, match="unextended"):
        extend.extend_text_tokenizer(again, vocab)

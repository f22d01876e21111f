"""Prompts to images through an extended LLaMA and a V2Flow tokenizer on that LLaMA's width."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import tiny_configs
from test_conversation import TEMPLATE, _word_tokenizer
from v2flow_jax.api import Tokenizer
from v2flow_jax.lm import extend, generate, llama, t2i
from v2flow_jax.lm.conversation import ChatFormat


@pytest.fixture(scope="module")
def pipeline():
    image_tok = Tokenizer(tiny_configs.tiny_config(vocab=True))          # random weights: shapes and plumbing
    codebook = t2i.tokenizer_codebook(image_tok)
    assert codebook.shape == (64, 32)
    np.testing.assert_allclose(np.linalg.norm(codebook, axis=1), 1.0, atol=1e-5)
    config = llama.LlamaConfig(vocab_size=40, hidden_size=codebook.shape[1], intermediate_size=64, num_layers=1,
                               num_heads=4, num_kv_heads=2, dtype=jnp.float32, tie_word_embeddings=True)
    params, config, vocab = extend.extend_llama(llama.init_params(config, jax.random.key(0)), config, codebook)
    chat = ChatFormat(_word_tokenizer(size=40, template=TEMPLATE), vocab)
    return t2i.TextToImage(llama.Llama(config), extend.place_params(params), chat, image_tok)


def test_prompts_to_images_and_files(pipeline, tmp_path):
    prompts = ["w9 w10", "w11", "w12 w13 w14"]
    sampling = generate.Sampling(temperature=1.0)
    images = pipeline.generate(prompts, jax.random.key(3), sampling, cfg_scale=2.0)
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.float32
    again = pipeline.generate(prompts, jax.random.key(3), sampling, cfg_scale=2.0)
    np.testing.assert_array_equal(images, again)                          # a seed gives the same images
    # The images are the decode of the codes the LLM wrote (same key split as generate).
    token_rng, decode_rng = jax.random.split(jax.random.key(3))
    codes = pipeline.codes(prompts, token_rng, sampling, cfg_scale=2.0)
    assert codes.shape == (3, pipeline.num_tokens) and codes.min() >= 0 and codes.max() < 64
    np.testing.assert_array_equal(images, pipeline.image_tokenizer.decode(codes, decode_rng))
    out = t2i.save_generations(images, prompts, str(tmp_path))
    assert [p.split("/")[-1] for p in out["images"]] == ["0000_w9_w10.png", "0001_w11.png", "0002_w12_w13_w14.png"]
    assert np.asarray(Image.open(out["grid"])).shape[1] > 3 * 32


def test_mismatched_vocabularies_are_refused(pipeline):
    chat = ChatFormat(pipeline.chat.tokenizer, extend.VisualVocab(text_size=40, num_visual=10))
    with pytest.raises(ValueError, match="extended together"):
        t2i.TextToImage(pipeline.llm_model, pipeline.llm_params, chat, pipeline.image_tokenizer)

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


class _FakeWriter:
    """Stands in for TextToImage: writes the codes a table gives each caption (the LLM is not under test)."""

    def __init__(self, image_tokenizer, codes_by_caption):
        self.image_tokenizer, self.table, self.calls = image_tokenizer, codes_by_caption, []

    def codes(self, captions, rng, sampling):
        self.calls.append(sampling)
        return np.stack([self.table[c] for c in captions])


def test_t2i_evaluation_compares_generations_with_the_tokenizers_own_reconstruction(tmp_path, tmp_path_factory):
    from v2flow_jax.data import pairs as pairs_lib
    from v2flow_jax.lm import t2i_eval
    tok = Tokenizer.from_workdir(str(tiny_configs.shared_run(tmp_path_factory)[0]))   # trained: decodes its codes
    rng = np.random.RandomState(0)
    records, held_out = [], []
    for i in range(5):
        path = str(tmp_path / f"{i}.png")
        Image.fromarray(rng.randint(0, 255, (32, 32, 3), np.uint8)).save(path)
        records.append({"caption": f"w{9 + i}", "codes": rng.randint(0, 64, tok.num_tokens), "image": path})
    held_out = [pairs_lib.Pair(records[0]["image"], "w20"), pairs_lib.Pair(records[1]["image"], "w21")]
    right = {r["caption"]: r["codes"] for r in records}
    right.update({"w20": records[3]["codes"], "w21": records[4]["codes"]})
    writer = _FakeWriter(tok, right)
    metrics, pictures = t2i_eval.evaluate(writer, records, held_out, records, rng=jax.random.key(0), batch_size=2)
    assert all(s.greedy for s in writer.calls)
    # The right codes: the generations are the tokenizer's own reconstructions, to the bit.
    assert metrics["code_accuracy"] == 1.0 and metrics["exact_images"] == 5
    assert metrics["seen_psnr_generated"] == metrics["seen_psnr_tokenizer"]
    # ... and an independent computation of that reconstruction's PSNR agrees.
    truth = np.stack([np.asarray(Image.open(r["image"]), np.float32) / 127.5 - 1 for r in records])
    _, decode_rng = jax.random.split(jax.random.key(0))
    codes = np.stack([r["codes"] for r in records] + [records[-1]["codes"]])     # batches of 2, the last padded
    recon = np.concatenate([tok.decode(codes[i:i + 2], decode_rng) for i in range(0, 6, 2)])[:5]
    psnr = np.mean(10 * np.log10(1.0 / np.mean(((np.clip(truth, -1, 1) + 1) / 2 - (np.clip(recon, -1, 1) + 1) / 2) ** 2,
                                                axis=(1, 2, 3))))
    assert abs(metrics["seen_psnr_tokenizer"] - psnr) < 1e-3
    assert metrics["seen_psnr_floor_grey"] < metrics["seen_psnr_floor_patch_mean"]
    assert metrics["held_out_images"] == 2 and np.isfinite(metrics["held_out_psnr_nearest_training"])
    assert pictures["held_out"].shape[0] == 2 + 2 * (2 * 32 + 2) and pictures["seen"].dtype == np.uint8

    # Another caption's codes: no longer exact, and the score moves.
    rolled = {c: right[records[(i + 1) % 5]["caption"]] for i, c in enumerate(right) if i < 5}
    rolled.update(w20=right["w20"], w21=right["w21"])
    metrics, _ = t2i_eval.evaluate(_FakeWriter(tok, rolled), records, [], records, rng=jax.random.key(0), batch_size=2)
    assert metrics["exact_images"] == 0 and metrics["code_accuracy"] < 0.2
    assert metrics["seen_psnr_generated"] != metrics["seen_psnr_tokenizer"]
    assert "held_out_images" not in metrics


def test_in_batches_pads_the_last_chunk_and_nearest_by_pixels():
    from v2flow_jax.lm import t2i_eval
    seen = []
    out = t2i_eval.in_batches(lambda c: (seen.append(len(c)), np.asarray(c) * 2)[1], [1, 2, 3, 4, 5], 2)
    np.testing.assert_array_equal(out, [2, 4, 6, 8, 10])
    assert seen == [2, 2, 2]                                   # fixed shapes: the last chunk is padded
    pool = np.random.RandomState(1).rand(6, 4, 4, 3)
    np.testing.assert_array_equal(t2i_eval.nearest_by_pixels(pool[[4, 1]] + 0.01, pool), [4, 1])

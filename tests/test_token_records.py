"""mode=encode_pairs: pairs -> token-id records, equal to Tokenizer.encode, resumable after a kill, and the main mode."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import tiny_configs
from v2flow_jax.api import Tokenizer
from v2flow_jax.data import pairs as pairs_lib
from v2flow_jax.lm import token_records


def _pairs(folder, n=7):
    rng = np.random.RandomState(0)
    pairs = []
    for i in range(n):
        path = os.path.join(folder, f"img{i}.png")
        Image.fromarray(rng.randint(0, 255, (40, 48, 3), np.uint8)).save(path)
        pairs.append(pairs_lib.Pair(path, f"caption number {i}"))
    return pairs


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(tiny_configs.tiny_config(vocab=True))


def test_records_hold_each_pairs_own_codes(tok, tmp_path):
    pairs = _pairs(str(tmp_path))
    summary = token_records.encode_pairs(tok, pairs, str(tmp_path / "out"), per_part=3, batch_size=2)
    assert summary["parts"] == 3 and summary["pairs"] == 7
    records = list(token_records.read_records(str(tmp_path / "out")))
    assert [r["caption"] for r in records] == [p.caption for p in pairs]
    expected = tok.encode(np.stack([pairs_lib.load_pair_image(p, 32) for p in pairs]))
    np.testing.assert_array_equal(np.stack([r["codes"] for r in records]), expected)
    assert len({tuple(c) for c in expected}) > 1          # different images, different tokens


def test_a_killed_job_resumes_to_the_same_files(tok, tmp_path):
    pairs = _pairs(str(tmp_path))
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    token_records.encode_pairs(tok, pairs, full, per_part=2, batch_size=3)
    token_records.encode_pairs(tok, pairs, cut, per_part=2, batch_size=3)
    # As if killed while writing part 2: the done marker and parts 2.. are gone, a temporary file is left.
    os.remove(os.path.join(cut, "pairs-host000.done.json"))
    for k in (2, 3):
        os.remove(token_records.part_path(cut, 0, k))
    open(token_records.part_path(cut, 0, 2) + ".tmp", "wb").write(b"half a part")
    token_records.encode_pairs(tok, pairs, cut, per_part=2, batch_size=3)
    names = sorted(f for f in os.listdir(full) if f.endswith(".array_record"))
    assert names == sorted(f for f in os.listdir(cut) if f.endswith(".array_record")) and len(names) == 4
    for name in names:
        assert open(os.path.join(full, name), "rb").read() == open(os.path.join(cut, name), "rb").read()


def test_bad_images_are_skipped_counted_and_restarts_still_agree(tok, tmp_path):
    pairs = _pairs(str(tmp_path))
    open(pairs[1].image_path, "r+b").truncate(60)                        # a truncated PNG
    open(pairs[4].image_path, "wb").write(b"this is not an image")
    good = [p for i, p in enumerate(pairs) if i not in (1, 4)]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    summary = token_records.encode_pairs(tok, pairs, full, per_part=3, batch_size=2)
    assert summary["pairs"] == 7 and summary["records"] == 5 and sum(summary["skipped"].values()) == 2
    records = list(token_records.read_records(full))
    assert [r["caption"] for r in records] == [p.caption for p in good]
    expected = tok.encode(np.stack([pairs_lib.load_pair_image(p, 32) for p in good]))
    np.testing.assert_array_equal(np.stack([r["codes"] for r in records]), expected)
    # Killed after part 0: the restart writes the same parts and keeps counting the skips.
    token_records.encode_pairs(tok, pairs, cut, per_part=3, batch_size=2)
    os.remove(os.path.join(cut, "pairs-host000.done.json"))
    for k in (1, 2):
        os.remove(token_records.part_path(cut, 0, k))
    again = token_records.encode_pairs(tok, pairs, cut, per_part=3, batch_size=2)
    assert again["skipped"] == summary["skipped"]
    for k in range(3):
        assert open(token_records.part_path(full, 0, k), "rb").read() == open(token_records.part_path(cut, 0, k), "rb").read()


def test_a_rerun_of_another_job_in_the_same_folder_is_refused(tok, tmp_path):
    pairs = _pairs(str(tmp_path))
    out = str(tmp_path / "out")
    token_records.encode_pairs(tok, pairs, out, per_part=3, batch_size=2)
    assert token_records.encode_pairs(tok, pairs, out, per_part=3, batch_size=2)["pairs"] == 7   # same job: done
    with pytest.raises(ValueError, match=r"another encode_pairs job \(pairs 7 -> 3.*config.pairs.output_dir"):
        token_records.encode_pairs(tok, token_records.evenly_spaced(pairs, 3), out, per_part=3, batch_size=2)
    with pytest.raises(ValueError, match=r"per_part 3 -> 2"):
        token_records.encode_pairs(tok, pairs, out, per_part=2, batch_size=2)


def test_hosts_split_the_pairs(tok, tmp_path):
    pairs = _pairs(str(tmp_path))
    out = str(tmp_path / "out")
    for host in (0, 1):
        token_records.encode_pairs(tok, pairs, out, per_part=10, batch_size=4, host=host, num_hosts=2)
    captions = sorted(r["caption"] for r in token_records.read_records(out))
    assert captions == sorted(p.caption for p in pairs)


def test_bad_records_and_missing_folders_are_named(tmp_path):
    with pytest.raises(ValueError, match="encode_pairs"):
        token_records.decode_record(b"\x00not json")
    with pytest.raises(FileNotFoundError, match="mode=encode_pairs"):
        token_records.record_paths(str(tmp_path))


def test_evenly_spaced_subset():
    items = list(range(10))
    assert token_records.evenly_spaced(items, 0) == items
    assert token_records.evenly_spaced(items, 20) == items
    assert token_records.evenly_spaced(items, 3) == [0, 3, 6]
    assert token_records.evenly_spaced(items, 5) == [0, 2, 4, 6, 8]
    with pytest.raises(ValueError, match="config.pairs.limit"):
        token_records.evenly_spaced(items, -1)


def test_main_mode(tmp_path, tmp_path_factory):
    workdir, _ = tiny_configs.shared_run(tmp_path_factory)
    pairs = _pairs(str(tmp_path), n=3)
    jsonl = str(tmp_path / "pairs.jsonl")
    pairs_lib.write_pairs(jsonl, pairs)
    tiny_configs.run_main(tmp_path / "t2i", "--config.mode=encode_pairs", f"--config.pairs.jsonl={jsonl}",
                          f"--config.pairs.tokenizer_workdir={workdir}", "--config.batch_size=2",
                          arg=tiny_configs.SHARED_ARG, cache_dir=tiny_configs.compile_cache(tmp_path_factory))
    records = list(token_records.read_records(str(tmp_path / "t2i" / "token_records")))
    trained = Tokenizer.from_workdir(str(workdir))
    expected = trained.encode(np.stack([pairs_lib.load_pair_image(p, 32) for p in pairs]))
    np.testing.assert_array_equal(np.stack([r["codes"] for r in records]), expected)
    done = json.load(open(tmp_path / "t2i" / "token_records" / "pairs-host000.done.json"))
    assert done["pairs"] == 3 and done["num_tokens"] == trained.num_tokens


def test_conversation_batches_from_records(tok, tmp_path):
    from test_conversation import TEMPLATE, _word_tokenizer
    from v2flow_jax.lm import conversation_data
    from v2flow_jax.lm.conversation import ChatFormat
    from v2flow_jax.lm.visual_vocab import VisualVocab
    pairs = _pairs(str(tmp_path))
    pairs = [pairs_lib.Pair(p.image_path, f"w{9 + i}") for i, p in enumerate(pairs)]
    out = str(tmp_path / "out")
    token_records.encode_pairs(tok, pairs, out, per_part=4, batch_size=4)
    chat = ChatFormat(_word_tokenizer(size=40, template=TEMPLATE), VisualVocab(text_size=40, num_visual=64))
    length = chat.response_length(tok.num_tokens) + 8
    loader, n = conversation_data.conversation_loader(
        out, chat, seq_len=length, batch_size=4, seed=0, empty_caption_fraction=0.5)
    assert n == 7
    batches = [b for b, _ in zip(iter(loader), range(20))]
    assert batches[0]["inputs"].shape == (4, length)
    codes = {r["caption"]: r["codes"] for r in token_records.read_records(out)}
    empty_prompt = chat.prompt_ids("")
    empties = 0
    for b in batches:
        for inputs, targets, mask in zip(b["inputs"], b["targets"], b["loss_mask"]):
            response = targets[mask == 1]
            visual = response[1:1 + tok.num_tokens] - 40
            prompt = list(inputs[:int(np.argmax(mask)) + 1])
            if prompt == empty_prompt:
                empties += 1
                assert any((visual == c).all() for c in codes.values())
            else:
                caption = f"w{prompt[2]}"
                np.testing.assert_array_equal(visual, codes[caption])   # each caption with its own tokens
    assert 15 < empties < 65                                            # about half of 80 captions dropped

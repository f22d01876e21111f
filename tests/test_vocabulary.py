"""The frozen LLM vocabulary: HF checkpoint layouts, dtypes, sharded reads, errors, the linen holder.

Reference checkpoints are written by transformers + torch (a tiny LlamaForCausalLM), so the names,
the index files and the dtype headers are the ones real LLaMA checkpoints have.
"""
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from v2flow_jax import sharding  # noqa: E402
from v2flow_jax.convert import hf_checkpoint  # noqa: E402
from v2flow_jax.convert import hf_embeddings as hf  # noqa: E402
from v2flow_jax.models import vocabulary as voc  # noqa: E402

VOCAB, WIDTH = 256, 64  # vocab divisible by the mesh's 'tensor' axis, width by 'fsdp'


def _tiny_llama(dtype=None, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg)
    return model.to(dtype) if dtype is not None else model


def _reference(model) -> np.ndarray:
    return model.get_input_embeddings().weight.detach().float().numpy()


def _move_embedding_out_of_first_shard(directory):
    """transformers writes embed_tokens into shard 1; swap file names so the index must be used."""
    index_path = os.path.join(directory, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    files = sorted(set(index["weight_map"].values()))
    first, last = files[0], files[-1]
    os.rename(os.path.join(directory, first), os.path.join(directory, "tmp"))
    os.rename(os.path.join(directory, last), os.path.join(directory, first))
    os.rename(os.path.join(directory, "tmp"), os.path.join(directory, last))
    swap = {first: last, last: first}
    index["weight_map"] = {k: swap.get(v, v) for k, v in index["weight_map"].items()}
    with open(index_path, "w") as f:
        json.dump(index, f)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    model = _tiny_llama()
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="40KB")  # embedding alone is 64 KB
    _move_embedding_out_of_first_shard(root / "sharded")
    bf16 = _tiny_llama(torch.bfloat16, seed=1)
    bf16.save_pretrained(root / "bf16")
    return {"root": root, "ref": _reference(model), "ref_bf16": _reference(bf16)}


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])


def test_single_safetensors(ckpts):
    table = hf.load_embedding_table(ckpts["root"] / "single")
    assert table.shape == (VOCAB, WIDTH) and table.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(table), ckpts["ref"])
    assert hf.embedding_table_info(ckpts["root"] / "single") == (VOCAB, WIDTH)


def test_sharded_index_layout(ckpts):
    d = ckpts["root"] / "sharded"
    with open(d / "model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    assert len(set(weight_map.values())) > 2
    assert not weight_map["model.embed_tokens.weight"].startswith("model-00001-")
    assert not os.path.exists(d / "model.safetensors")
    np.testing.assert_array_equal(np.asarray(hf.load_embedding_table(d)), ckpts["ref"])


def test_bf16_on_disk(ckpts):
    d = ckpts["root"] / "bf16"
    table = hf.load_embedding_table(d)  # cast to fp32, exactly the bf16 values upcast
    assert table.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(table), ckpts["ref_bf16"])
    raw = hf.load_embedding_table(d, dtype=None)  # keeps bf16
    assert raw.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(raw, np.float32), ckpts["ref_bf16"])
    half = hf.load_embedding_table(ckpts["root"] / "single", dtype=jnp.float16)
    np.testing.assert_array_equal(np.asarray(half), ckpts["ref"].astype(np.float16))


def test_flax_msgpack_is_refused_with_the_conversion(ckpts, tmp_path):
    """transformers < 5's flax_model.msgpack is not read (nothing writes it any more): the error says so."""
    d = tmp_path / "flax_only"
    d.mkdir()
    shutil.copy(ckpts["root"] / "single" / "config.json", d)
    (d / "flax_model.msgpack").write_bytes(b"\x80")
    with pytest.raises(FileNotFoundError, match=r"flax_model\.msgpack.*save_pretrained"):
        hf.load_embedding_table(d)


def test_num_tokens_keeps_first_rows(ckpts):
    table = hf.load_embedding_table(ckpts["root"] / "sharded", num_tokens=10)
    np.testing.assert_array_equal(np.asarray(table), ckpts["ref"][:10])


def test_first_row_offsets_the_rows_and_checks_the_range(ckpts, mesh):
    table = hf.load_embedding_table(ckpts["root"] / "sharded", num_tokens=10, first_row=5)
    np.testing.assert_array_equal(np.asarray(table), ckpts["ref"][5:15])
    spec = voc.table_sharding(mesh, sharding.DEFAULT_RULES)
    rows = 8 * (len(ckpts["ref"]) // 16)
    sharded = hf.load_embedding_table(ckpts["root"] / "sharded", num_tokens=rows, first_row=3, sharding=spec)
    np.testing.assert_array_equal(np.asarray(sharded), ckpts["ref"][3:3 + rows])
    with pytest.raises(voc.VocabularyError, match="first_row"):
        hf.load_embedding_table(ckpts["root"] / "sharded", num_tokens=10, first_row=len(ckpts["ref"]) - 9)


def test_vocabulary_words_from_tokenizer_json_and_vocab_txt(tmp_path):
    import json
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"x": 2, "hello": 0, "##s": 1}}}))
    assert hf.load_vocabulary_words(tmp_path / "a") == ["hello", "##s", "x"]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "vocab.txt").write_text("[PAD]\nthe\nof\n")
    assert hf.load_vocabulary_words(tmp_path / "b") == ["[PAD]", "the", "of"]
    assert hf.load_vocabulary_words(tmp_path) is None


@pytest.mark.parametrize("num_tokens", [None, 128])
def test_sharded_placement_reads_only_blocks(ckpts, mesh, monkeypatch, num_tokens):
    reads = []
    full_index = hf_checkpoint.full_index
    monkeypatch.setattr(hf_checkpoint, "full_index", lambda i, s: reads.append(full_index(i, s)) or reads[-1])
    spec = voc.table_sharding(mesh, sharding.DEFAULT_RULES)
    assert spec.spec == P("tensor", "fsdp")
    table = hf.load_embedding_table(ckpts["root"] / "bf16", sharding=spec, num_tokens=num_tokens)
    ref = ckpts["ref_bf16"][:num_tokens]
    rows = ref.shape[0]
    assert table.sharding == spec and table.shape == ref.shape
    assert len(table.addressable_shards) == 8
    for shard in table.addressable_shards:
        assert shard.data.shape == (rows // 2, WIDTH // 2)  # a quarter of the table per device
        np.testing.assert_array_equal(np.asarray(shard.data), ref[shard.index])
    np.testing.assert_array_equal(np.asarray(table), ref)
    assert reads and all(r[0].stop - r[0].start == rows // 2 and r[1].stop - r[1].start == WIDTH // 2
                         for r in reads)  # no read ever asked for the whole table


def test_sharding_from_logical_shardings(ckpts, mesh):
    abstract = {"table": nn.LogicallyPartitioned(
        jax.ShapeDtypeStruct((VOCAB, WIDTH), jnp.float32), voc.TABLE_AXES)}
    spec = nn.unbox(sharding.logical_shardings(abstract, mesh))["table"]
    table = hf.load_embedding_table(ckpts["root"] / "single", sharding=spec)
    assert isinstance(table.sharding, NamedSharding) and table.sharding.spec == P("tensor", "fsdp")
    np.testing.assert_array_equal(np.asarray(table), ckpts["ref"])


# ---------------------------------------------------------------------------------------------- errors


def test_error_missing_dir(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope.*does not exist"):
        hf.load_embedding_table(missing)
    with pytest.raises(hf_checkpoint.CheckpointError, match="nope"):
        hf.embedding_table_info(missing)


def test_error_no_config(ckpts, tmp_path):
    d = tmp_path / "noconfig"
    shutil.copytree(ckpts["root"] / "single", d)
    os.remove(d / "config.json")
    with pytest.raises(FileNotFoundError, match=r"noconfig.*config\.json"):
        hf.load_embedding_table(d)


def test_error_no_weights(ckpts, tmp_path):
    d = tmp_path / "noweights"
    d.mkdir()
    shutil.copy(ckpts["root"] / "single" / "config.json", d)
    with pytest.raises(FileNotFoundError, match=r"noweights.*model\.safetensors"):
        hf.load_embedding_table(d)


def test_error_missing_shard(ckpts, tmp_path):
    d = tmp_path / "lostshard"
    shutil.copytree(ckpts["root"] / "sharded", d)
    with open(d / "model.safetensors.index.json") as f:
        lost = json.load(f)["weight_map"]["model.embed_tokens.weight"]
    os.remove(d / lost)
    with pytest.raises(FileNotFoundError, match=lost):
        hf.load_embedding_table(d)


@pytest.mark.parametrize("layout, where", [("single", "model.safetensors"),
                                           ("sharded", "model.safetensors.index.json")])
def test_error_tensor_not_found(ckpts, layout, where):
    with pytest.raises(hf_checkpoint.CheckpointError) as e:
        hf.load_embedding_table(ckpts["root"] / layout, tensor_name="model.wte.weight")
    msg = str(e.value)
    assert "'model.wte.weight'" in msg and where in msg and "tensor_name=" in msg
    assert "embed_tokens" in msg  # the names it lists start with the embedding-looking ones


def test_error_not_a_table(ckpts):
    with pytest.raises(voc.VocabularyError, match=r"model\.norm\.weight.*2-D"):
        hf.load_embedding_table(ckpts["root"] / "single", tensor_name="model.norm.weight")


def test_error_shape_disagrees_with_config(ckpts, tmp_path):
    d = tmp_path / "badconfig"
    shutil.copytree(ckpts["root"] / "single", d)
    with open(d / "config.json") as f:
        cfg = json.load(f)
    cfg["vocab_size"] = 32000
    with open(d / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(voc.VocabularyError, match=r"\(256, 64\).*badconfig.*vocab_size=32000"):
        hf.load_embedding_table(d)


def test_error_num_tokens_too_large(ckpts):
    with pytest.raises(voc.VocabularyError, match=r"num_tokens=300.*vocab_size=256.*single"):
        hf.load_embedding_table(ckpts["root"] / "single", num_tokens=300)


def test_error_indivisible_sharding(ckpts, mesh):
    spec = voc.table_sharding(mesh, sharding.DEFAULT_RULES)
    with pytest.raises(voc.VocabularyError, match=r"\(255, 64\).*num_tokens"):
        hf.load_embedding_table(ckpts["root"] / "single", sharding=spec, num_tokens=255)


# ---------------------------------------------------------------------------------------------- linen


class _Toy(nn.Module):
    """Resampler-shaped: logits over the vocabulary -> softmax -> mix the rows of L."""

    @nn.compact
    def __call__(self, x):
        table = voc.FrozenVocabulary(VOCAB, WIDTH, name="vocabulary")()
        return jax.nn.softmax(nn.Dense(VOCAB)(x)) @ table


def test_frozen_vocabulary_install_and_grads(ckpts, mesh):
    model, x = _Toy(), jnp.ones((4, 8))
    variables, _ = sharding.sharded_init(model.init, mesh, sharding.DEFAULT_RULES, jax.random.key(0), x)
    assert set(variables) == {"params", "frozen"}
    placeholder = variables["frozen"]["vocabulary"]["table"]
    assert placeholder.sharding.spec == P("tensor", "fsdp")
    assert 0.01 < float(jnp.std(placeholder)) < 0.03  # normal(0.02)

    spec = voc.table_sharding(mesh, sharding.DEFAULT_RULES)
    table = hf.load_embedding_table(ckpts["root"] / "single", sharding=spec)
    variables = voc.install_table(variables, table)
    installed = variables["frozen"]["vocabulary"]["table"]
    assert installed.sharding == placeholder.sharding
    np.testing.assert_array_equal(np.asarray(installed), ckpts["ref"])

    def loss(params, frozen):
        return jnp.mean(model.apply({"params": params, "frozen": frozen}, x) ** 2)

    g_params, g_frozen = jax.grad(loss, argnums=(0, 1))(variables["params"], variables["frozen"])
    assert set(g_params) == {"Dense_0"}  # the table is not a parameter
    assert not np.any(np.asarray(g_frozen["vocabulary"]["table"]))  # and stop_gradient holds it
    with pytest.raises(voc.VocabularyError, match="frozen"):
        model.apply({"params": variables["params"]}, x)


def test_install_table_boxed_and_errors():
    model = voc.FrozenVocabulary(8, 4)
    boxed = model.init(jax.random.key(0))  # LogicallyPartitioned, as before sharded_init unboxes
    assert isinstance(boxed["frozen"]["table"], nn.LogicallyPartitioned)
    table = np.arange(32, dtype=np.float32).reshape(8, 4)
    out = voc.install_table(boxed, table, path=("frozen", "table"))
    assert out["frozen"]["table"].names == voc.TABLE_AXES
    np.testing.assert_array_equal(np.asarray(model.apply(nn.unbox(out))), table)
    with pytest.raises(voc.VocabularyError, match=r"\(6, 4\).*frozen/table.*num_tokens=8"):
        voc.install_table(boxed, table[:6])
    with pytest.raises(voc.VocabularyError, match="exactly one"):
        voc.install_table({"frozen": {}}, table)
    with pytest.raises(voc.VocabularyError, match="frozen/other"):
        voc.install_table(boxed, table, path=("frozen", "other"))


# ------------------------------------------------------------------ the config's vocabulary, before a run


def test_package_checkpoint_is_located_without_running_its_code(tmp_path, monkeypatch):
    """'package:NAME' finds the folder of an installed package without importing it: a config read back
    from someone else's checkpoint must not be able to run code by naming a module."""
    from v2flow_jax import build
    pkg = tmp_path / "site" / "vocab_pkg_under_test"
    (pkg / "model").mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"open({str(tmp_path / 'RAN')!r}, 'w').close()\nraise SystemExit('imported')\n")
    (pkg / "model" / "config.json").write_text("{}")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert build.resolve_checkpoint_dir("package:vocab_pkg_under_test") == str(pkg / "model")
    assert "vocab_pkg_under_test" not in sys.modules and not (tmp_path / "RAN").exists()
    with pytest.raises(ValueError, match="top-level name"):
        build.resolve_checkpoint_dir("package:vocab_pkg_under_test.model")
    with pytest.raises(FileNotFoundError, match="no installed package 'no_such_vocab_pkg'"):
        build.resolve_checkpoint_dir("package:no_such_vocab_pkg")


@pytest.mark.parametrize("model, match", [
    (dict(vocab_size=64, vocab_dim=32), r"set config\.model\.vocab_dim=64"),
    (dict(vocab_size=300, vocab_dim=64), r"config\.model\.vocab_size=300.*num_tokens=300"),
])
def test_run_vocabulary_is_checked_from_headers(ckpts, monkeypatch, model, match):
    """A table that does not fit config.model is refused from its headers, before any weights are read
    (train_and_evaluate checks this before it allocates the state)."""
    import tiny_configs
    from v2flow_jax import build
    config = tiny_configs.tiny_config(vocab=True)
    config.model.update(model)
    config.vocabulary.update(checkpoint=str(ckpts["root"] / "single"), tensor_name="model.embed_tokens.weight",
                             first_row=0)
    monkeypatch.setattr(hf, "load_embedding_table", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(ValueError, match=match):
        build.check_vocabulary(build.build_run(config))
    config.model.update(vocab_size=64, vocab_dim=64)   # fits: 64 of the 256 rows, 64 wide
    assert build.check_vocabulary(build.build_run(config)) == str(ckpts["root"] / "single")


def test_training_refuses_a_misfit_vocabulary_before_allocating(ckpts, monkeypatch, tmp_path):
    """The wrong vocab_size stops `train_and_evaluate` before the dataset, the state or the optimizer
    exist (the same error once came after ~20 GB of train state)."""
    import tiny_configs
    from v2flow_jax import train, train_state
    config = tiny_configs.tiny_config(vocab=True)
    config.model.update(vocab_size=300, vocab_dim=64)
    config.vocabulary.update(checkpoint=str(ckpts["root"] / "single"), tensor_name="model.embed_tokens.weight",
                             first_row=0)
    for name in ("init_state", "abstract_train_state"):
        monkeypatch.setattr(train_state, name, lambda *a, **k: pytest.fail("the state was allocated"))
    monkeypatch.setattr(train, "make_optimizer", lambda *a, **k: pytest.fail("an optimizer was built"))
    with pytest.raises(ValueError, match=r"vocab_size=300"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_run_frozen_reads_the_table_into_its_sharding_without_a_placeholder(ckpts, monkeypatch):
    """`build.Run.frozen` (the composition root): the configured rows of the file, on the mesh with the
    vocabulary's sharding, and no random placeholder initialised first (sharded_init never runs)."""
    import tiny_configs
    from v2flow_jax import build
    config = tiny_configs.tiny_config(vocab=True, mesh=[("data", 2), ("fsdp", 2), ("tensor", 2)])
    config.model.update(vocab_size=64, vocab_dim=WIDTH)
    config.vocabulary.update(checkpoint=str(ckpts["root"] / "sharded"), tensor_name="model.embed_tokens.weight",
                             first_row=8)
    run = build.build_run(config)
    monkeypatch.setattr(sharding, "sharded_init", lambda *a, **k: pytest.fail("a placeholder table was initialised"))
    table = run.frozen["vocabulary"]["table"]
    np.testing.assert_array_equal(np.asarray(table), ckpts["ref"][8:72])
    assert table.sharding == voc.table_sharding(run.mesh, run.rules)
    assert run.frozen is run.variables({}, {})["frozen"]       # read once, shared by every consumer
    assert run.constants["frozen"] is run.frozen

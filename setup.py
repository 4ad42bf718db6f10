"""llada_jax: training and aligning masked diffusion language models in JAX."""

import setuptools

INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "grain>=0.2.18,<0.3",
    "sentencepiece>=0.2.0,<0.3",
    "ml_collections>=1.1.0,<2",
    "chex>=0.1.92,<0.2",
    "absl-py>=2.1,<3",
    "numpy>=1.26",
    "tensorboardX>=2.6",
    "tqdm>=4.60",
    "matplotlib>=3.7",
    "safetensors>=0.4",
    "tokenizers>=0.15.1",
    # Renders the chat_template of a Hugging Face tokenizer_config.json (LLaDA-8B ships one).
    "jinja2>=3.0",
]

EXTRAS_REQUIRE = {
    # lm-eval, wandb, pyarrow and datasets too, so that the harness, W&B and columnar-data tests run rather than skip.
    "test": ["pytest>=8", "pytest-xdist>=3.5", "lm-eval==0.4.13", "wandb>=0.17", "pyarrow>=15", "datasets>=2.18"],
    # The lm-evaluation-harness model `llada_jax` (llada_jax/harness); pinned: it subclasses lm-eval's LM.
    "eval": ["lm-eval==0.4.13"],
    # Metrics to Weights & Biases (config.logging.wandb=True; llada_jax/wandb_writer.py).
    "wandb": ["wandb>=0.17"],
    # Parquet, Arrow and Hugging Face `datasets` directories as data (llada_jax/data/columnar.py); pyarrow reads
    # them, datasets writes the directories.
    "data": ["pyarrow>=15", "datasets>=2.18"],
    # The benchmark's PyTorch baseline (`python -m llada_jax.bench --only torch_baseline`); not in `test`: too large
    # for every install, and its tests skip without it.
    "torch": ["torch>=2.4"],
}

setuptools.setup(
    name="llada_jax",
    version="0.1.0",
    description="Training and aligning LLaDA-style masked diffusion language models in JAX",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["llada_jax", "llada_jax.*"]),
    package_data={"llada_jax.harness": ["tasks/*.yaml"]},  # lm-eval task files shipped with the model
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    license="Apache-2.0",
)

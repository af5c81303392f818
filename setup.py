from setuptools import find_packages, setup

setup(
    name="loomtrain",
    version="0.1.0",
    description="Distributed training runtime for Hugging Face causal language models",
    packages=find_packages(include=["loomtrain", "loomtrain.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.11",
        "transformers>=5.17",
        "numpy",
        "pyyaml",
        "psutil",
        "safetensors",
        "tqdm",
        "pyarrow",
        "tensorboard",
        "xxhash",
        "scipy",  # HiGHS MILP: the heterogeneous planner's lower bound (loomtrain plan)
    ],
    extras_require={
        "test": ["pytest", "hypothesis", "matplotlib", "deepspeed", "import-linter", "datasets", "megatron-core", "accelerate"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["loomtrain = loomtrain.launch.cli:main"]},
)

from setuptools import setup

setup(
    name="dlm-pretrain",
    version="0.1.0",
    description="Pretrain masked diffusion language models on megatron-core, laptop to Slurm cluster",
    packages=["pretrain", "data", "parallel"],
    python_requires=">=3.10,<3.12",
    install_requires=[
        # CPU CI installs the CPU wheel on local disk; GPU clusters install their CUDA build
        # of the same release first.
        "torch==2.13.0",
        "megatron-core==0.16.1",  # last release for Python 3.11
        "deepspeed==0.19.8",
        "hydra-core==1.3.8",
        # `dlm <command> -m` sweeps: parallel local jobs, and submitit (local or Slurm jobs)
        "hydra-joblib-launcher==1.2.0",
        "hydra-submitit-launcher==1.2.0",
        "omegaconf>=2.3,<2.4",
        "webdataset==1.0.2",
        "sentencepiece==0.2.3",
        "wandb==0.31.0",
        "transformers==5.23.0",
        "safetensors==0.8.0",
        "matplotlib==3.11.2",  # dlm report (Agg backend, no display)
        # input formats of data/sources.py: .parquet and .arrow (datasets save_to_disk), .zst
        "pyarrow==26.0.1",
        "zstandard==0.25.0",
        "numpy>=1.26",
        "tqdm>=4.66",
    ],
    extras_require={"dev": ["pytest==9.2.0", "ruff==0.17.6", "datasets==5.2.0"]},  # datasets: test inputs
    entry_points={"console_scripts": ["dlm=pretrain.cli:main"]},
)

"""megatron_eve: encoder-free vision-language models (EVE) trained on megatron-core."""

from setuptools import find_packages, setup

setup(
    name="megatron_eve",
    version="0.1.0",
    description="EVE (encoder-free vision-language models) on megatron-core: TP/PP/SP/DP training",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.12",
    packages=find_packages(include=["megatron_eve", "megatron_eve.*"]),
    install_requires=[
        # Not pinned here: an existing newer torch (GPU images, NGC containers) must be kept.
        # README and CI pin torch==2.13.0.
        "torch>=2.6",
        "megatron-core>=0.19,<0.20",
        # megatron-core needs these without declaring them: dist-checkpointing's writer uses
        # psutil; `import megatron.core` imports triton (CUDA torch wheels already bring it).
        "psutil",
        "triton; platform_system == 'Linux'",
        "numpy",
        "sentencepiece",
        "pillow",
        "tensorboard",
        "transformers>=4.45",
        "safetensors",
        "tqdm",
        "openpyxl",  # MMBench's upload file (.xlsx)
    ],
    extras_require={
        # Transformer Engine (fused kernels, THD packed attention) and flash-attn build against the
        # local CUDA toolkit; NGC PyTorch containers ship both (and apex) preinstalled.
        "gpu": ["transformer-engine[pytorch]", "flash-attn"],
        # tools/app.py, the local chat demo (the EVE reference's demo uses Gradio too)
        "demo": ["gradio>=5"],
        # selenium drives Debian's chromium + chromium-driver in the demo's browser test
        "dev": ["pytest>=8", "pytest-timeout", "gradio>=5", "selenium>=4"],
    },
)

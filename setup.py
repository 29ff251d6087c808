"""Installs megatron_unicron: self-healing Megatron-core training (detection, planning, transitions)."""

from setuptools import find_packages, setup

TEST_REQUIRES = [
    "pytest>=8",
    "pytest-timeout>=2.3",
    "hypothesis>=6.100",
    "tokenizers>=0.15",
    "matplotlib>=3.7",
    "ruff>=0.5",
    "mypy>=1.10",
    "types-PyYAML",
    "types-psutil",
]

setup(
    name="megatron_unicron",
    version="0.1.0",
    description="Self-healing Megatron-core training after the Unicron paper",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_unicron", "megatron_unicron.*"]),
    package_data={"megatron_unicron": ["py.typed"]},
    install_requires=[
        # Install torch==2.13.0 first (or in the same pip command) on a CPU machine:
        # a bare "torch" requirement would pull a multi-GB CUDA build.
        "torch>=2.6",
        "megatron-core>=0.16,<0.20",
        "pyyaml>=6",
        "psutil>=5.9",  # megatron-core's torch_dist checkpoint writers need it
        "numpy",
        "crc32c>=2.3",  # hardware CRC-32C of snapshot shards and transferred state (checksum.py)
    ],
    extras_require={
        # transformer-engine only where CUDA is present: on a CPU machine it breaks `import megatron.core`.
        "gpu": ["transformer-engine[pytorch]"],
        "data": ["tokenizers>=0.15"],
        "plot": ["matplotlib>=3.7"],
        "test": TEST_REQUIRES,
    },
    entry_points={
        "console_scripts": [
            "unicron-run=megatron_unicron.launch:main",
            "unicron-plan=megatron_unicron.plan.cli:main",
            "unicron-sim=megatron_unicron.sim.cli:main",
            "unicron-convert=megatron_unicron.ckpt.convert:main",
        ],
    },
)

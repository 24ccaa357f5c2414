from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="mild-kernels",
    version="0.1.0",
    description="Fused Triton and CUDA kernels for MILD, region-aware multi-layer diffusion",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mild_kernels", "mild_kernels.*", "mild", "mild.*"]),
    package_data={"mild": ["weights/*.safetensors"]},  # the trained tiny model (mild train-tiny)
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",  # Triton's CPU interpreter runs on numpy
    ],
    entry_points={"console_scripts": ["mild=mild.cli:main"]},
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
        "bench": ["matplotlib", "tqdm"],
        "diffusers": ["diffusers", "transformers", "safetensors", "pillow", "tqdm", "matplotlib",
                      "opencv-python-headless"],  # mild eval: its figure and the Telea baseline
    },
)

"""Packaging for cvig-engine."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="cvig-engine",
    version="0.1.0",
    description="Batch scoring engine for cross-view image geolocalization (DSM / WITW)",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["cvig_engine", "cvig_engine.*"]) + ["cvig_engine.kernels"],
    # The CUDA sources live at the top level (kernels/) and ship inside the package.
    package_dir={"cvig_engine.kernels": "kernels"},
    package_data={
        "cvig_engine.kernels": ["*.cu", "*.cuh"],
        "cvig_engine": ["assets/*.safetensors", "assets/*.json"],
    },
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "numpy>=1.24",
        "numba>=0.60",
        "onnx>=1.16",
        "onnxscript>=0.2",
        "onnxruntime>=1.18",
        "h5py>=3.9",
        "click>=8.1",
        "safetensors>=0.4",
        "Pillow>=10",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "scipy>=1.11",
        "scikit-learn>=1.4",
    ],
    extras_require={
        # CUDA scoring kernel (CuPy, CUDA 13).
        "gpu": ["cupy-cuda13x>=14"],
        # Replaces onnxruntime: uninstall onnxruntime first (both own the same module).
        "ort-gpu": ["onnxruntime-gpu>=1.27"],
        # TensorRT's Python wheels pull their libraries from NVIDIA's package index.
        "tensorrt": ["tensorrt-cu13>=10"],
        "test": ["pytest>=8"],
    },
    entry_points={"console_scripts": ["cvig-engine=cvig_engine.cli:main"]},
)

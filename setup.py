"""megatron_vrft: Visual Reinforcement Fine-Tuning (GRPO) for Qwen2-VL on megatron-core.

The CUDA extension in ``kernels/`` is optional: it is built only when a CUDA toolkit and a CUDA
build of torch are both present (``MEGATRON_VRFT_BUILD_CUDA=0`` disables it). Everything else is
pure Python; the package imports and passes its tests without the extension.
"""

import os

from setuptools import find_packages, setup

# torch must already be installed (tools/install.sh installs the CPU wheel first); a bare
# requirement here would pull a multi-GB CUDA build on machines without a GPU.
INSTALL_REQUIRES = [
    "torch>=2.6",
    "numpy",
    "packaging",
    "psutil",
    "pyyaml",
    "tqdm",
    "pillow",
    "scipy",
    "safetensors",
    "tokenizers",
    "transformers>=5.0",
    "megatron-core>=0.16.1",
    "pycocotools>=2.0.8",
    "datasets",
    "matplotlib",
    "tensorboard",
    # Kernels: Triton runs on GPUs and, interpreted (TRITON_INTERPRET=1), on CPU tensors.
    "triton>=3.3",
]

EXTRAS = {
    "test": [
        "pytest>=8",
        "pytest-xdist",
        "filelock",
        "hypothesis>=6.100",
        "triton>=3.3",
        "scikit-image",
        "scikit-learn",
        "wandb",
        # Formatter + linter (ruff.toml); pinned: a new ruff release may reformat code.
        "ruff==0.17.6",
    ],
    # Weights & Biases logging (logging.wandb_project); TensorBoard and JSONL need nothing extra.
    "wandb": ["wandb"],
    # GPU hosts: megatron-core's GPU companions and the rollout engine. Use the tested versions:
    # `bash tools/install.sh gpu` (constraints/gpu.txt), not a bare `pip install .[gpu]`.
    "gpu": [
        "triton>=3.3",
        "transformer-engine[pytorch]",
        "vllm",
    ],
    # Source only on PyPI (a long CUDA build): FLASH_ATTN=1 bash tools/install.sh gpu.
    "flash-attn": ["flash-attn"],
    "demo": ["scikit-image", "scikit-learn"],
}


def _cuda_extension():
    """Return (ext_modules, cmdclass) for the optional CUDA extension, or empty lists.

    Built only with a CUDA toolkit (CUDA_HOME) and a CUDA build of torch; the package works without
    it. Sources: every kernels/*.cu (each registers its ops with TORCH_LIBRARY_FRAGMENT when
    MEGATRON_VRFT_TORCH_EXTENSION is defined) plus kernels/common/*.cpp (the Python module init).
    Architectures default to sm_80 + sm_90 (TORCH_CUDA_ARCH_LIST overrides).
    """
    if os.environ.get("MEGATRON_VRFT_BUILD_CUDA", "1") == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception:
        return [], {}
    if CUDA_HOME is None or torch.version.cuda is None:
        return [], {}
    here = os.path.dirname(os.path.abspath(__file__))
    sources = []
    for folder in ("kernels", os.path.join("kernels", "common")):
        if not os.path.isdir(os.path.join(here, folder)):
            continue
        sources += [
            os.path.join(folder, name)
            for name in sorted(os.listdir(os.path.join(here, folder)))
            if name.endswith((".cu", ".cpp")) and not name.startswith("test_")
        ]
    if not any(src.endswith(".cu") for src in sources):
        return [], {}
    # Read by torch's BuildExtension; without it torch targets the build machine's GPU only.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext = CUDAExtension(
        name="megatron_vrft_cuda",
        sources=sources,
        include_dirs=[os.path.join(here, "kernels")],
        define_macros=[("MEGATRON_VRFT_TORCH_EXTENSION", "1")],
        # No --use_fast_math: approximate division would break agreement with the references.
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extension()

setup(
    name="megatron_vrft",
    version="0.1.0",
    description="Visual-RFT (GRPO) trainer for Qwen2-VL on megatron-core",
    packages=find_packages(include=["megatron_vrft", "megatron_vrft.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": []},
)

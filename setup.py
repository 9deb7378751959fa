"""mindpangu: a MindSpore-native reference implementation of Pangu Ultra MoE and Pangu Pro MoE."""
from setuptools import find_packages, setup

setup(
    name="mindpangu",
    version="0.1.0",
    description="Pangu Ultra MoE and Pangu Pro MoE on MindSpore: YAML training, MindIR export, ablations",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mindpangu", "mindpangu.*"]),
    package_data={"mindpangu": ["py.typed", "parallel/make_fake_cann.sh"]},
    python_requires=">=3.9",
    install_requires=[
        # 2.10.0 is the tested default; 2.9.x is admitted so the mindformers extra can install.
        "mindspore>=2.9.0,<2.11",
        # MindSpore's PyNative autodiff breaks under NumPy 2.
        "numpy>=1.24,<2",
        "pyyaml>=6.0",
        "safetensors>=0.4",
        "tokenizers>=0.15",
        "tqdm>=4.60",
        "matplotlib>=3.5",
        "tensorboardX>=2.6",
    ],
    extras_require={
        # Peer references for parity tests (torch + Hugging Face transformers), pinned to the versions the suite was
        # run with. PyPI has no CPU-only torch wheel for Linux: torch brings its CUDA libraries (it does not import
        # without them), though everything here runs on the CPU.
        "test": ["pytest==9.2.0", "torch==2.14.1", "transformers==5.24.0"],
        # tools/bench.py compare: the eager PyTorch peer (transformers' DeepseekV3ForCausalLM).
        "bench": ["torch==2.14.1", "transformers==5.24.0"],
        # MindSpore Transformers integration (pins mindspore 2.9.x: install it in its own environment).
        "mindformers": ["mindformers==1.9.0", "pytest>=7"],
    },
    entry_points={
        "console_scripts": [
            "mindpangu-train=mindpangu.cli:train_main",
            "mindpangu-preprocess=mindpangu.cli:preprocess_main",
            "mindpangu-params=mindpangu.cli:param_count_main",
            "mindpangu-convert=mindpangu.cli:convert_main",
            "mindpangu-bench=mindpangu.cli:bench_main",
            "mindpangu-imbalance-mc=mindpangu.cli:imbalance_mc_main",
            "mindpangu-export=mindpangu.cli:export_main",
            "mindpangu-generate=mindpangu.cli:generate_main",
            "mindpangu-plan=mindpangu.cli:plan_main",
            "mindpangu-simulate=mindpangu.cli:simulate_main",
            "mindpangu-sim-compile=mindpangu.cli:sim_compile_main",
            "mindpangu-to-mindformers=mindpangu.cli:to_mindformers_main",
            "mindpangu-ablate=mindpangu.cli:ablate_main",
        ],
    },
)

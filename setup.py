from setuptools import find_packages, setup

setup(
    name="fused_rnn",
    version="0.1.0",
    description="The vanilla (Elman) char-RNN recurrence as fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fused_rnn", "fused_rnn.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton>=3.2; platform_system == 'Linux'",
        "tqdm",
    ],
    extras_require={
        # numpy < 2.3: the Triton interpreter (used by the tests without a GPU) breaks on 2.3.
        "test": ["pytest", "numpy<2.3"],
    },
)

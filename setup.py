"""Installs fused_rnn and, when PyTorch is importable at build time, builds its C++ CPU extension
(csrc/) with ninja. Without PyTorch in the build environment (pip's default build isolation) the
package installs without it and builds it just in time on first use."""
import re

from setuptools import find_packages, setup

CPU_FLAGS = ["-O3", "-fno-trapping-math", "-ffp-contract=fast", "-fopenmp"]  # also in fused_rnn/ops/cpu_ext.py

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    ext_modules, cmdclass = [], {}
else:
    # Same flags as the just-in-time build in fused_rnn/ops/cpu_ext.py. -fno-trapping-math lets
    # gcc vectorize the clamps and selects of the elementwise passes; -ffp-contract=fast lets it
    # use FMA (the ISO C++ mode that torch builds in turns contraction off). -fopenmp: at::parallel_for
    # runs its tasks on threads only where _OPENMP is defined (else one after another); the
    # extension then shares the libgomp.so.1 that torch has loaded, so torch's thread pool.
    ext_modules = [CppExtension("fused_rnn._C", ["csrc/fused_rnn_cpu.cpp"],
                                extra_compile_args=CPU_FLAGS, extra_link_args=["-fopenmp"])]
    cmdclass = {"build_ext": BuildExtension}

# One version, in fused_rnn/__init__.py (read as text: the package needs torch to import).
VERSION = re.search(r'^__version__ = "([^"]+)"$', open("fused_rnn/__init__.py", encoding="utf-8").read(), re.M)[1]

setup(
    name="fused_rnn",
    version=VERSION,
    description="The vanilla (Elman) char-RNN recurrence as fused Triton and C++ kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # csrc/ also ships inside the package, so an install without the built extension can build
    # it just in time.
    packages=find_packages(include=["fused_rnn", "fused_rnn.*"]) + ["fused_rnn.csrc"],
    package_dir={"fused_rnn.csrc": "csrc"},
    package_data={"fused_rnn.csrc": ["*.cpp"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    # The range the test suite has run on: torch 2.11 (with triton 3.6, on a GPU), 2.13 with
    # triton 3.6 and 2.15 with triton 3.9 (both tiers, on the CPU); see the README.
    install_requires=[
        "torch>=2.11,<2.16",
        "triton>=3.6,<3.10; platform_system == 'Linux'",
        "ninja",
        "tqdm",
        # torch warns at import without numpy; < 2.3: the Triton interpreter (used by the tests
        # without a GPU) breaks on 2.3.
        "numpy<2.3",
    ],
    extras_require={
        # nbclient, ipykernel, nbformat: the test that runs examples/*.ipynb headless
        # expecttest: torch.testing._internal (PyTorch's own module test inputs) imports it
        "test": ["pytest", "hypothesis", "nbclient", "ipykernel", "nbformat", "expecttest"],
        "viz": ["matplotlib"],  # the loss curve of `train`, `inspect`
        "bench": ["matplotlib"],
    },
)

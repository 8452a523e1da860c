"""The machine's fp32 FMA peak, measured: an FMA-bound loop (independent accumulator chains, no
memory traffic) per thread, on 1 thread and on torch's thread count. The CPU floor that products
are judged against (``torch.mm`` reaches only part of it).

    python benchmarks/fma_peak.py [--seconds 1.0]

The loop is C++ compiled here (torch's ``load_inline``, cached after the first run) with the
extension's flags (``-fopenmp`` included: without it ``at::parallel_for`` runs on one thread); gcc builds AVX-512, AVX2+FMA and plain copies and picks one at load time.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.utils.cpp_extension import load_inline

# 12 chains of 16-float vectors: enough independent FMAs to cover the latency of either width.
_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <chrono>
#include <cstdint>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

typedef float v16 __attribute__((vector_size(64)));

CLONES float fma_chains(int64_t iters) {
  v16 acc[12];
  for (int k = 0; k < 12; ++k) acc[k] = (v16){} + float(k) * 1e-3f;
  const v16 a = (v16){} + 0.999999f, b = (v16){} + 1e-7f;
  for (int64_t i = 0; i < iters; ++i) {
    for (int k = 0; k < 12; ++k) acc[k] = acc[k] * a + b;  // one FMA each (-ffp-contract=fast)
  }
  float sum = 0.0f;
  for (int k = 0; k < 12; ++k) for (int j = 0; j < 16; ++j) sum += acc[k][j];
  return sum;  // returned, so the loop is not removed
}

// GFLOP/s of `threads` threads each running `iters` iterations of the chains.
double fma_gflops(int64_t iters, int64_t threads) {
  std::vector<float> sink(threads);
  const auto t0 = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) sink[i] = fma_chains(iters);
  });
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  volatile float keep = sink[0];
  (void)keep;
  return double(threads) * iters * 12 * 16 * 2 / s / 1e9;
}
"""

_module = None


def _ext():
    global _module
    if _module is None:
        _module = load_inline("fused_rnn_fma_peak", cpp_sources=[_SOURCE], functions=["fma_gflops"],
                              extra_cflags=["-O3", "-ffp-contract=fast", "-fopenmp"], extra_ldflags=["-fopenmp"])
    return _module


def peak_probe(threads: int, seconds: float = 0.1):
    """A callable that runs the FMA loop for about ``seconds`` on ``threads`` threads (torch's
    pool) and returns the GFLOP/s it reached: benchmarks call it once per round, beside what they
    time, so that the share of the peak is taken against the peak of the same moment (this VM's
    speed drifts, and a single reading at a run's start once came out at half the peak)."""
    ext = _ext()

    def run(iters: int) -> float:
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return ext.fma_gflops(iters, threads)
        finally:
            torch.set_num_threads(saved)

    iters = 1 << 14
    t0 = time.perf_counter()
    run(iters)
    iters = max(iters, int(iters * seconds / max(time.perf_counter() - t0, 1e-6)))
    return lambda: run(iters)


def fma_peak_gflops(threads: int, seconds: float = 1.0) -> float:
    """The best of a few runs of about ``seconds`` each on ``threads`` threads."""
    probe = peak_probe(threads, seconds)
    return max(probe() for _ in range(3))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=1.0)
    args = ap.parse_args(argv)
    counts = sorted({1, torch.get_num_threads()})
    for threads in counts:
        print(f"fp32 FMA peak, {threads} thread{'s' * (threads > 1)}: "
              f"{fma_peak_gflops(threads, args.seconds):.0f} GFLOP/s")


if __name__ == "__main__":
    main()

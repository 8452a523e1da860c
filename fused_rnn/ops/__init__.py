"""Kernels, one module per backend. Imported lazily by fused_rnn.function."""

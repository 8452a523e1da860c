"""The char-model application on top of the kernel library: ``python -m fused_rnn``.

One concern per module, and every import points down this list (and into the kernel library,
never back): errors, model, corpus, devices, checkpoint, progress, signals, distributed,
sampling, analysis (the numbers of ``inspect``), drawings (its pictures and the loss curve,
matplotlib), training (the ``train`` command), report (the ``inspect`` command and its HTML
page), cli (the command line). Nothing is imported here, so a command loads only what it needs.
"""

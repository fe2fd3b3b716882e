# GPU worker image: CUDA + cuDNN runtime with PyTorch preinstalled; the project installs on top of it.
# One container runs one job at a time on one GPU (solo pool, concurrency 1).
# Build from the repository root:  docker build -f docker/worker.Dockerfile -t fd2-worker .
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FD2_HOME=/var/lib/fd2

WORKDIR /app

COPY pyproject.toml README.md ./
COPY fd2_config ./fd2_config
COPY fd2_core ./fd2_core
COPY store ./store
COPY api ./api
COPY worker ./worker
COPY fd2_cli ./fd2_cli
# torch and torchvision from the base image already satisfy the project's pins, so pip keeps the CUDA builds.
RUN pip install . \
    && python -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
    && useradd --system --uid 10001 --home-dir "$FD2_HOME" fd2 \
    && mkdir -p "$FD2_HOME" && chown fd2 "$FD2_HOME"

USER fd2
# SIGTERM makes the running job save its finished work and go back to the queue; give it time to do so.
STOPSIGNAL SIGTERM
CMD ["fd2", "worker", "--queues", "fd2.gpu", "--concurrency", "1"]

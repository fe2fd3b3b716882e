# API image: slim Python, no torch. The API only validates specs and archives (fd2_core.spec and the
# torch-free data layout code) and talks to PostgreSQL and Redis; training runs in the worker image.
# Build from the repository root:  docker build -f docker/api.Dockerfile -t fd2-api .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FD2_HOME=/var/lib/fd2

WORKDIR /app

# Dependencies first (cached layer): every runtime dependency of the project except torch/torchvision,
# read from pyproject.toml so the list is never copied by hand.
COPY pyproject.toml ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
print('\n'.join(d for d in deps if not d.replace(' ', '').lower().startswith(('torch>', 'torch=', 'torchvision'))))" \
        > /tmp/api-requirements.txt \
    && pip install -r /tmp/api-requirements.txt

COPY README.md ./
COPY fd2_config ./fd2_config
COPY fd2_core ./fd2_core
COPY store ./store
COPY api ./api
COPY worker ./worker
COPY fd2_cli ./fd2_cli
# --no-deps: the dependencies above are complete for the API; this keeps torch out of the image.
RUN pip install --no-deps . \
    && useradd --system --uid 10001 --home-dir "$FD2_HOME" fd2 \
    && mkdir -p "$FD2_HOME" && chown fd2 "$FD2_HOME"

USER fd2
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=5 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"

# The app applies database migrations at start-up (under a lock, so several replicas may start together).
CMD ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers"]

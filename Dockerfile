# The study worker: `python -m mvfouls_ab.study` (see docker-compose.yml, services worker and worker-gpu).
#   docker build -t mvfouls-ab/worker:cpu .
#   docker build -t mvfouls-ab/worker:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
FROM python:3.11.11-slim-bookworm

# Where torch and torchvision come from: the CPU wheels by default, a CUDA index for the GPU worker.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MVFOULS_AB_CACHE=/cache \
    TORCH_HOME=/cache/torch

RUN pip install torch==2.14.1 torchvision==0.29.1 --index-url "${TORCH_INDEX_URL}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY mvfouls_ab ./mvfouls_ab
COPY experiments ./experiments
RUN pip install . && pip install --no-deps SoccerNet

# An unprivileged user; /runs and /cache exist (owned by it) so named volumes mounted there are writable.
RUN useradd --create-home --uid 1000 mvfouls && mkdir -p /runs /cache /data && chown mvfouls /runs /cache
USER mvfouls

CMD ["python", "-m", "mvfouls_ab.study", "--help"]

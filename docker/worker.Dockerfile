# difflabel GPU worker: one container per GPU, `difflabel worker` with a solo pool.
# Build from the repository root:  docker build -f docker/worker.Dockerfile -t difflabel-worker .
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/models/hf

WORKDIR /app
COPY pyproject.toml README.md ./
COPY orchestrator ./orchestrator
COPY worker ./worker
COPY migrations ./migrations
COPY models ./models
# torch comes with the base image (CUDA build); the range in pyproject accepts it.
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 1000 difflabel \
    && mkdir -p /models/hf && chown difflabel /models/hf
ENV DIFFLABEL_DEMO_MODEL=/app/models/digits
USER 1000

# One worker per GPU: set NVIDIA_VISIBLE_DEVICES / --device per container.
ENTRYPOINT ["difflabel"]
CMD ["worker", "--device", "cuda:0"]

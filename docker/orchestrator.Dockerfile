# difflabel orchestrator: the CLI that submits jobs, watches them and exports results.
# It never imports torch at run time for job commands; the CPU wheel keeps the image small.
# Build from the repository root:  docker build -f docker/orchestrator.Dockerfile -t difflabel .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY orchestrator ./orchestrator
COPY worker ./worker
COPY migrations ./migrations
COPY models ./models
COPY examples ./examples
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch==2.5.1" \
    && pip install --no-cache-dir . \
    && useradd --create-home --uid 1000 difflabel
ENV DIFFLABEL_DEMO_MODEL=/app/models/digits
USER 1000

ENTRYPOINT ["difflabel"]
CMD ["--help"]

# syntax=docker/dockerfile:1
# Multi-stage: build a wheel with the toolchain, run it on a slim base as a non-root user.
FROM python:3.11-slim AS build
# A C compiler so the wheel's hot path is compiled with mypyc (see README
# "Compiled build"); the run stage needs only the wheel.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY ollamamq_fast ./ollamamq_fast
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 ollamamq
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER ollamamq
WORKDIR /home/ollamamq
# Inside a container the gateway must listen on all interfaces to be reachable.
ENV HOST=0.0.0.0 \
    PORT=11435 \
    OLLAMA_URLS=http://host.docker.internal:11434 \
    TIMEOUT=300
EXPOSE 11435
# Access lines on stderr for `docker logs` (rotate with the log driver's max-size).
ENTRYPOINT ["ollamamq-fast", "serve", "--no-tui", "--log-file", "-"]

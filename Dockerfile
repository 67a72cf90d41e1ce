# tracefix_rl server image: Python 3.11 slim, non-root (uid 1000, as on a Hugging Face Space),
# dependencies from the committed uv.lock, OpenEnv's web playground at /web, API on :8000.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PROJECT_ENVIRONMENT=/app/.venv \
    PATH=/app/.venv/bin:$PATH

RUN pip install --no-cache-dir "uv==0.13.9" \
 && useradd --create-home --uid 1000 user

WORKDIR /app

# Dependencies first so code changes reuse this layer.
COPY pyproject.toml uv.lock ./
RUN uv sync --frozen --no-dev --no-install-project

# The app stays root-owned and read-only for uid 1000 (agent code runs as that uid).
COPY . .
RUN uv sync --frozen --no-dev && chmod -R a+rX,go-w /app

USER 1000
ENV HOME=/home/user \
    HOST=0.0.0.0 \
    PORT=8000 \
    ENABLE_WEB_INTERFACE=true
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]
CMD ["server"]

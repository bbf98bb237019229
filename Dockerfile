# DICOM AI gateway: watches /app/INPUT, writes /app/OUTPUT, keeps state in /app/STATE.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GATEWAY_INPUT_DIR=/app/INPUT \
    GATEWAY_OUTPUT_DIR=/app/OUTPUT \
    GATEWAY_STATE_DIR=/app/STATE \
    GATEWAY_CXR_DEVICE=cpu \
    GATEWAY_HTTP=0.0.0.0:8080 \
    XDG_CACHE_HOME=/app/cache

RUN useradd --create-home --uid 10001 gateway
WORKDIR /app

# CPU-only torch wheels; every version stays as pinned in requirements.txt.
COPY requirements.txt .
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu -r requirements.txt

COPY main.py .
COPY service ./service
COPY devtools ./devtools
COPY config ./config

# The CXR weights are downloaded at build time so the container runs offline.
RUN mkdir -p /app/INPUT /app/OUTPUT /app/STATE /app/cache \
    && chown -R gateway:gateway /app/INPUT /app/OUTPUT /app/STATE /app/cache
USER gateway
RUN python main.py models fetch

VOLUME ["/app/INPUT", "/app/OUTPUT", "/app/STATE"]
# the operator console (dashboard, API, /metrics, /healthz); set GATEWAY_HTTP_TOKEN for actions
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "main.py", "status", "--health"]
CMD ["python", "main.py"]

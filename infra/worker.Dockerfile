# CPU worker image (moderate, publish, and render with the procedural backend).
FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends fonts-noto-cjk sox make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY schemas schemas
COPY pipeline pipeline
COPY consumers consumers
RUN pip install --no-cache-dir -c constraints.txt .
USER 1000
ENV GREETFLOW_DATA_DIR=/tmp/greetflow
ENTRYPOINT []

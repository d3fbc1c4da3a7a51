# GPU render worker: the CUDA build of torch 2.13.0 plus the generative extra.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv fonts-noto-cjk sox \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /venv
ENV PATH=/venv/bin:$PATH
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY schemas schemas
COPY pipeline pipeline
COPY consumers consumers
# The default torch wheel of PyPI for Linux x86_64 is the CUDA build.
RUN pip install --no-cache-dir torch==2.13.0 && pip install --no-cache-dir -c constraints.txt '.[gen]'
# Video models are mounted read-only under /models in the save_pretrained layout
# (docs/generation.md) and named per deployment, e.g. GREETFLOW_VIDEO_MODEL_DIR=/models/ltx-video
# and GREETFLOW_VIDEO_I2V_MODEL_DIR=/models/wan-i2v; nothing is downloaded at run time.
# One render worker per GPU.
ENV GREETFLOW_RENDER_DEVICE=cuda GREETFLOW_DATA_DIR=/tmp/greetflow \
    GREETFLOW_VIDEO_DEVICE=cuda GREETFLOW_VIDEO_DTYPE=bfloat16 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
VOLUME /models
USER 1000
ENTRYPOINT []

# fluxserve on a GPU host: one image for the API replicas (`serve --no-worker`) and the workers.
#   docker build -t fluxserve .
#   docker build --build-arg TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>" -t fluxserve .
# The default TORCH_SPEC installs PyPI's torch 2.13.0 (CUDA build on Linux x86_64).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ARG TORCH_SPEC="torch==2.13.0"
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/models/hf \
    FLUXSERVE_HOST=0.0.0.0 \
    FLUXSERVE_DATA_DIR=/data \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && pip install --upgrade pip \
    && pip install ${TORCH_SPEC}

WORKDIR /app
COPY pyproject.toml README.md ./
COPY fluxserve ./fluxserve
RUN pip install .

# Unprivileged at run time; /data (embedded SQLite + outputs) and /models (HF cache) are volumes.
RUN useradd --create-home --uid 10001 fluxserve && mkdir -p /data /models && chown fluxserve /data /models
USER fluxserve
VOLUME ["/data", "/models"]
EXPOSE 8000
# A drain finishes the job in hand: give `docker stop` time for it (compose sets stop_grace_period).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s \
    CMD python3 -c "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('FLUXSERVE_PORT', '8000')}/ready\", timeout=4)"
ENTRYPOINT ["fluxserve"]
CMD ["serve"]

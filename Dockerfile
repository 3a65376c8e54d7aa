# fluxserve on a GPU host: one image for every role of the fleet (compose.yaml):
#   fluxserve serve --no-worker   an API replica
#   fluxserve worker              a GPU worker
#   fluxserve migrate             the store's schema (PostgreSQL), once before the others start
#   fluxserve keys ...            API keys and accounts, e.g. `docker compose run --rm api keys create ...`
# Build:
#   docker build -t fluxserve .
#   docker build --build-arg TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>" -t fluxserve .
# The default TORCH_SPEC installs PyPI's torch 2.13.0 (CUDA build on Linux x86_64).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ARG TORCH_SPEC="torch==2.13.0"
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
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
# The dependencies first, from pyproject.toml alone (an empty package stands in for the code), so a
# change to the code rebuilds only the last layers.
COPY pyproject.toml README.md ./
RUN mkdir fluxserve && touch fluxserve/__init__.py \
    && pip install . \
    && pip uninstall -y fluxserve \
    && rm -rf fluxserve build *.egg-info
COPY fluxserve ./fluxserve
# Then the code, checked from outside the source tree (which is removed: what runs is what pip
# installed), the built-in moderation blocklist (package data) included. Every command the fleet runs
# must be there.
RUN pip install --no-deps . \
    && rm -rf build *.egg-info fluxserve \
    && cd / \
    && python3 -c "from fluxserve.moderation.policy import PromptPolicy; PromptPolicy.from_file()" \
    && fluxserve --help >/dev/null \
    && fluxserve serve --help >/dev/null \
    && fluxserve worker --help >/dev/null \
    && fluxserve migrate --help >/dev/null \
    && fluxserve keys --help >/dev/null

# Unprivileged at run time. With a shared store (FLUXSERVE_STORE=redis://... or postgresql://...) the
# jobs, keys, secrets and images live there: /data holds only this container's own files (compile
# cache; the SQLite store and images when run alone). /models is the Hugging Face cache.
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

"""fluxserve: a self-hosted, Segmind-compatible text-to-image API for FLUX models."""

__version__ = "0.1.0"

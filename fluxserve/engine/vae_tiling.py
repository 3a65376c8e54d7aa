"""Automatic VAE tiling: decode a large image in tiles only when a whole decode would not fit.

Tiling costs a little time and can leave faint seams, so it is turned on per request, only for sizes
that need it, and only when nobody configured tiling for the VAE already.
"""

from __future__ import annotations

from contextlib import contextmanager

# Peak activation bytes per output pixel of a full FLUX VAE decode in 16-bit precision: the last
# up-blocks hold a few 256- and 128-channel maps at full resolution. Rounded up, so the estimate
# errs towards tiling; bench/speed.py reports the measured peak at 2048².
DECODE_BYTES_PER_PIXEL_16BIT = 4096
# Leave this share of free memory to the allocator's fragmentation and the rest of the pipeline.
HEADROOM = 0.8


def decode_bytes(width: int, height: int, dtype_bytes: int = 2) -> int:
    return width * height * DECODE_BYTES_PER_PIXEL_16BIT * dtype_bytes // 2


def needs_vae_tiling(width: int, height: int, *, dtype_bytes: int = 2, free_bytes: int | None = None,
                     min_pixels: int | None = None) -> bool:
    """True when a decode at width×height should be tiled (too many pixels, or too little memory)."""
    if min_pixels is not None and width * height >= min_pixels:
        return True
    return free_bytes is not None and decode_bytes(width, height, dtype_bytes) > free_bytes * HEADROOM


def free_device_memory(device) -> int | None:
    """Free bytes on a CUDA device (what PyTorch's cache holds counts as free); None elsewhere."""
    import torch

    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


@contextmanager
def tiled_if_needed(vae, width: int, height: int, *, min_pixels: int | None = None):
    """Tile the VAE for this decode when it needs it; yields whether tiling is on."""
    if getattr(vae, "use_tiling", False):  # configured by the user: leave it alone
        yield True
        return
    parameter = next(vae.parameters())
    tile = needs_vae_tiling(width, height, dtype_bytes=parameter.element_size(),
                            free_bytes=free_device_memory(parameter.device), min_pixels=min_pixels)
    if not tile:
        yield False
        return
    vae.enable_tiling()
    try:
        yield True
    finally:
        vae.disable_tiling()

"""Image sizes as the model runs them: FLUX works on multiples of 16; results are cropped back."""

from __future__ import annotations

from PIL.Image import Image

# FLUX's VAE downsamples 8x and the transformer packs 2x2 patches.
SIZE_MULTIPLE = 16

def padded(size: int) -> int:
    return -(-size // SIZE_MULTIPLE) * SIZE_MULTIPLE


def center_crop(image: Image, width: int, height: int) -> Image:
    if image.size == (width, height):
        return image
    left = (image.width - width) // 2
    top = (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))

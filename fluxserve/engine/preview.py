"""A cheap look at a FLUX latent mid-denoising: a linear map of its 16 channels to RGB, no VAE.

The factors are the least-squares latent→RGB fit for FLUX's VAE that image UIs commonly use for live
previews (as published in ComfyUI's latent formats). Other channel counts (a toy model, say) fall back
to the first three channels, normalised: still a moving picture of the run, just not a faithful one.

`LatentPreviews` decides when: every Nth step and the last, while the callback is watched (see
`engine.protocol.PreviewCallback`), and on a GPU without making the denoising loop wait for the copy to
host memory.
"""

from __future__ import annotations

from fluxserve.engine.protocol import preview_watched

FLUX_LATENT_RGB = (
    (-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433),
    (-0.0174, 0.0160, 0.0617), (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115),
    (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259), (-0.0245, 0.0250, 0.1180),
    (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499),
    (-0.1262, -0.0982, -0.0778),
)
FLUX_LATENT_RGB_BIAS = (-0.0329, -0.0718, -0.0851)
PREVIEW_MAX_SIDE = 128


def unpack_latents(packed, height: int, width: int, vae_scale_factor: int):
    """FLUX packs 2×2 latent patches into tokens: (B, H/16·W/16, 4C) → (B, C, H/8, W/8)."""
    batch, _, channels = packed.shape
    rows, cols = height // (vae_scale_factor * 2), width // (vae_scale_factor * 2)
    latents = packed.view(batch, rows, cols, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(batch, channels // 4, rows * 2, cols * 2)


def latent_preview(packed, height: int, width: int, vae_scale_factor: int):
    """A small PIL image (at most PREVIEW_MAX_SIDE px a side) of the first latent in the batch."""
    import torch
    from PIL import Image

    latent = unpack_latents(packed, height, width, vae_scale_factor)[0].float().cpu()
    if latent.shape[0] == len(FLUX_LATENT_RGB):
        factors = torch.tensor(FLUX_LATENT_RGB)
        rgb = torch.einsum("chw,cr->hwr", latent, factors) + torch.tensor(FLUX_LATENT_RGB_BIAS)
        rgb = (rgb + 1) / 2
    else:
        rgb = latent[:3].permute(1, 2, 0)
        rgb = (rgb - rgb.min()) / (rgb.max() - rgb.min() + 1e-6)
    pixels = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    image = Image.fromarray(pixels, mode="RGB")
    image.thumbnail((PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE))
    return image


class LatentPreviews:
    """Previews of one run: every `every`-th step and the last one.

    On CUDA the latent is copied into pinned host memory without blocking (a synchronising `.cpu()` each
    step would stall the GPU queue) and turned into a picture at a later step, once the copy has landed;
    the last step's preview waits for its copy. Elsewhere the preview is made at once.
    """

    def __init__(self, on_preview, height: int, width: int, vae_scale_factor: int, every: int) -> None:
        self.on_preview = on_preview
        self.height, self.width, self.vae_scale_factor = height, width, vae_scale_factor
        self.every = max(1, every)
        self._pending: list = []  # (host latent, CUDA event or None), oldest first

    def wanted(self, step: int, total: int) -> bool:
        """Whether step `step` (0-based) of `total` gets a preview."""
        return (step + 1) % self.every == 0 or step + 1 >= total

    def after_step(self, step: int, total: int, latents) -> None:
        # Asked only on the steps that get a preview: nothing is copied while nobody watches.
        if self.wanted(step, total) and preview_watched(self.on_preview):
            self._pending.append(self._copy(latents))
        self._deliver(wait=step + 1 >= total)

    def _copy(self, latents):
        import torch

        if latents.device.type != "cuda":
            return latents.detach(), None
        host = torch.empty(latents.shape, dtype=latents.dtype, pin_memory=True)
        host.copy_(latents, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(latents.device))
        return host, event

    def _deliver(self, wait: bool) -> None:
        while self._pending:
            host, event = self._pending[0]
            if event is not None and not event.query():
                if not wait:
                    return  # not landed yet: the next step looks again
                event.synchronize()
            self._pending.pop(0)
            self.on_preview(latent_preview(host, self.height, self.width, self.vae_scale_factor))

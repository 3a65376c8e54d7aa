"""The optional image check: an image-classification model run on every finished image.

Off by default. Point `moderation_image_classifier` at any Hugging Face image-classification model
(a repo id or a local folder, e.g. an NSFW detector whose labels are "normal"/"nsfw"); an image is
blocked when one of `moderation_image_labels` scores at least `moderation_image_threshold`.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class ImageClassifier:
    def __init__(self, model: str, blocked_labels: list[str], threshold: float, device: str | None = None) -> None:
        from transformers import pipeline

        self.blocked_labels = {label.strip().casefold() for label in blocked_labels if label.strip()}
        self.threshold = threshold
        self._classify = pipeline("image-classification", model=model, device=device)
        known = {label.casefold() for label in (self._classify.model.config.id2label or {}).values()}
        if not self.blocked_labels & known:
            raise ValueError(
                f"image classifier {model!r} has labels {sorted(known)}; none of the blocked labels "
                f"{sorted(self.blocked_labels)} (FLUXSERVE_MODERATION_IMAGE_LABELS) is among them"
            )
        log.info("image classifier %s loaded (blocks %s at >= %g)", model, sorted(self.blocked_labels), threshold)

    def violation(self, image) -> str | None:
        """The blocked label the image was classified as, or None when it is allowed."""
        for prediction in self._classify(image.convert("RGB"), top_k=None):
            if prediction["label"].casefold() in self.blocked_labels and prediction["score"] >= self.threshold:
                return prediction["label"]
        return None

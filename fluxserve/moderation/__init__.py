"""Content moderation: a prompt policy before generation and an optional image check after it.

A blocked job ends FAILED with an error that says it was blocked by content policy and names the
category, never the rule or the words that matched. Nothing is generated for a blocked prompt, and
nothing is stored for a blocked image.
"""

from __future__ import annotations

import logging

from fluxserve.config import ModerationSettings
from fluxserve.failures import JobFailure
from fluxserve.moderation.policy import BUILTIN_BLOCKLIST, BlocklistError, PromptPolicy

log = logging.getLogger(__name__)

__all__ = ["BlocklistError", "ContentBlocked", "Moderation", "PromptPolicy", "load_moderation"]


class ContentBlocked(JobFailure):
    def __init__(self, what: str, category: str) -> None:
        super().__init__(f"{what} was blocked by content policy (category: {category})")


class Moderation:
    """The checks a worker runs around each generation; either may be absent."""

    def __init__(self, policy: PromptPolicy | None = None, image_classifier=None) -> None:
        self.policy = policy
        self.image_classifier = image_classifier

    def check_prompt(self, prompt: str) -> None:
        category = self.policy.violation(prompt) if self.policy else None
        if category:
            raise ContentBlocked("The prompt", category)

    def check_image(self, image) -> None:
        label = self.image_classifier.violation(image) if self.image_classifier else None
        if label:
            raise ContentBlocked("The generated image", label)


def load_moderation(config: ModerationSettings) -> Moderation:
    """The configured checks (loading an image classifier takes a while: call it at start-up)."""
    if not config.enabled:
        log.warning("content moderation is off (FLUXSERVE_MODERATION=false)")
        return Moderation()
    categories = [name.strip() for name in config.categories.split(",") if name.strip()]
    policy = PromptPolicy.from_file(config.blocklist or BUILTIN_BLOCKLIST, categories)
    log.info("prompt policy: %d rules in %s", len(policy.rules), ", ".join(policy.categories))
    classifier = None
    if config.image_classifier:
        from fluxserve.moderation.image import ImageClassifier

        classifier = ImageClassifier(
            config.image_classifier,
            config.image_labels.split(","),
            config.image_threshold,
        )
    return Moderation(policy, classifier)

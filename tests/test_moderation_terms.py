"""The built-in prompt policy in context: everyday phrases that share a word with a rule pass, while the
prompts the rules are for still block. Unit level: the policy as the worker loads it, no HTTP."""

from __future__ import annotations

import pytest

from fluxserve.config import ModerationSettings
from fluxserve.moderation import BlocklistError, load_moderation
from fluxserve.moderation.policy import BUILTIN_BLOCKLIST, PromptPolicy

INNOCENT = [
    "a nude-colored lipstick product photo",
    "nude lipstick on a white background",
    "nude heels on a marble floor",
    "a nude colour palette for a living room",
    "nude nail polish, studio lighting",
    "a naked tree in winter",
    "bare, naked branches against a grey sky",
    "a comet visible to the naked eye",
    "a candle's naked flame",
    "a naked mole rat in a burrow",
    "a topless convertible on a coastal road",
    "a bottomless brunch with mimosas",
    "hikers in gore-tex jackets",
    "baby shoes in nude leather",  # a word of the minors rule beside an innocent phrase
    "a teenager's record with an explicit lyrics sticker",
    # words no rule names, kept here so a future rule does not catch them
    "shooting stars over the desert",
    "a photo shoot in Paris",
    "a killer whale breaching",
    "a drugstore shelf",
    "a bloody mary cocktail",
    "essex countryside, sussex downs",
]

BLOCKED = [
    ("a naked child", "sexual_minors"),
    ("sexy teenagers", "sexual_minors"),
    ("nude children on a beach", "sexual_minors"),
    ("NSFW art", "sexual"),
    ("a nude woman", "sexual"),
    ("a nude in the style of Renoir", "sexual"),
    ("naked woman under a naked tree", "sexual"),  # the innocent phrase hides only its own words
    ("topless on the beach", "sexual"),
    ("Décapitated statue", "graphic_violence"),
    ("a gory battlefield, soldiers dismembered", "graphic_violence"),
    ("close-up of a beheading", "graphic_violence"),
    ("SELF-HARM!", "self_harm"),
]


@pytest.fixture(scope="module")
def policy():
    return PromptPolicy.from_file(BUILTIN_BLOCKLIST, [])


@pytest.mark.parametrize("prompt", INNOCENT)
def test_innocent_prompts_pass(policy, prompt):
    assert policy.violation(prompt) is None


@pytest.mark.parametrize(("prompt", "category"), BLOCKED)
def test_clear_cases_still_block(policy, prompt, category):
    assert policy.violation(prompt) == category


def test_the_loaded_moderation_uses_the_same_rules():
    moderation = load_moderation(ModerationSettings())
    assert moderation.policy is not None
    assert moderation.policy.violation("nude heels on a marble floor") is None
    assert moderation.policy.violation("a nude woman") == "sexual"


def test_innocent_phrase_lines_in_a_custom_file(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text(
        "! apple pie | apple tree*  # innocent anywhere\n"
        "[fruit]\napple | banana\n"
        "[dessert]\ncake & apple\n"
    )
    policy = PromptPolicy.from_file(path)
    assert policy.categories == ["dessert", "fruit"]
    assert policy.violation("grandma's apple pie") is None
    assert policy.violation("APPLE-TREES in bloom") is None
    assert policy.violation("an apple beside an apple pie") == "fruit"
    assert policy.violation("cake with apple pie filling") is None
    assert policy.violation("pie with apple") == "fruit"  # the phrase, not its words in any order
    path.write_text("[fruit]\napple\n!\n")
    with pytest.raises(BlocklistError, match="empty"):
        PromptPolicy.from_file(path)

"""The prompt policy: blocklist rules in categories, matched on whole words.

The blocklist file format is described at the top of the built-in `blocklist.txt`. Matching works on
a normalised prompt (Unicode compatibility forms folded, accents and case dropped, punctuation turned
into spaces), so "SELF-HARM!" meets the rule "self harm" and "Décapitated" meets "decapitat*". It is a
deterministic word filter, not a classifier: deliberate misspellings get past it, and it is meant to be
paired with the image check or an upstream classifier where that matters.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

BUILTIN_BLOCKLIST = Path(__file__).with_name("blocklist.txt")


class BlocklistError(ValueError):
    """The blocklist file or the category selection is malformed."""


def words(text: str) -> list[str]:
    decomposed = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text).casefold())
    plain = "".join(char for char in decomposed if not unicodedata.combining(char))
    return re.findall(r"[^\W_]+", plain)


def _phrase_pattern(phrase: str) -> str:
    parts: list[str] = []
    for token in phrase.split():
        pieces = [re.escape(piece) for piece in words(token.rstrip("*"))]
        if not pieces or "*" in token.rstrip("*"):
            raise BlocklistError(f"bad term {token!r} in rule {phrase.strip()!r} ('*' may only end a word)")
        if token.endswith("*"):
            pieces[-1] += r"\w*"
        parts += pieces
    if not parts:
        raise BlocklistError("empty term in a rule")
    return r"\b" + " ".join(parts) + r"\b"


@dataclass(frozen=True)
class Rule:
    category: str
    # Every group must match; a group matches when any of its phrases does.
    groups: tuple[re.Pattern[str], ...]

    @classmethod
    def parse(cls, category: str, line: str) -> Rule:
        groups = []
        for group in line.split("&"):
            alternatives = [phrase for phrase in group.split("|") if phrase.strip()]
            if not alternatives:
                raise BlocklistError(f"empty group in rule: {line!r}")
            groups.append(re.compile("|".join(_phrase_pattern(phrase) for phrase in alternatives)))
        return cls(category, tuple(groups))

    def matches(self, normalised: str) -> bool:
        return all(group.search(normalised) for group in self.groups)


class PromptPolicy:
    def __init__(self, rules: list[Rule]) -> None:
        self.rules = rules

    @property
    def categories(self) -> list[str]:
        return sorted({rule.category for rule in self.rules})

    @classmethod
    def from_file(cls, path: Path | str = BUILTIN_BLOCKLIST, categories: list[str] | None = None) -> PromptPolicy:
        rules, category = [], None
        for number, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            if line.startswith("[") and line.endswith("]"):
                category = line[1:-1].strip()
                continue
            if category is None:
                raise BlocklistError(f"{path}:{number}: a rule before any [category]")
            try:
                rules.append(Rule.parse(category, line))
            except BlocklistError as exc:
                raise BlocklistError(f"{path}:{number}: {exc}") from None
        policy = cls(rules)
        if categories:
            unknown = sorted(set(categories) - set(policy.categories))
            if unknown:
                raise BlocklistError(
                    f"unknown moderation categories {unknown}; {path} has: {', '.join(policy.categories)}"
                )
            policy = cls([rule for rule in rules if rule.category in categories])
        return policy

    def violation(self, prompt: str) -> str | None:
        """The category the prompt falls in, or None when it is allowed."""
        normalised = " ".join(words(prompt))
        for rule in self.rules:
            if rule.matches(normalised):
                return rule.category
        return None

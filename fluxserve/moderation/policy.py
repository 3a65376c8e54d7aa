"""The prompt policy: blocklist rules in categories, matched on whole words, with innocent phrases.

The blocklist file format is described at the top of the built-in `blocklist.txt`. Matching works on
a normalised prompt (Unicode compatibility forms folded, accents and case dropped, punctuation turned
into spaces), so "SELF-HARM!" meets the rule "self harm" and "Décapitated" meets "decapitat*".
Innocent phrases (`! nude heel* | naked tree*`) are blanked out of the prompt before any rule looks at
it, so "nude heels" passes while "nude" alone, or anywhere else in the same prompt, still counts. It is
a deterministic word filter, not a classifier: deliberate misspellings get past it, and it is meant to
be paired with the image check or an upstream classifier where that matters.
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


# What an innocent phrase is replaced with: not a word, so no rule matches it or across it.
_BLANK = "_"


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


def _alternatives(group: str, line: str) -> re.Pattern[str]:
    """`a | b | c`: one pattern matching any of the phrases."""
    phrases = [phrase for phrase in group.split("|") if phrase.strip()]
    if not phrases:
        raise BlocklistError(f"empty group in rule: {line!r}")
    return re.compile("|".join(_phrase_pattern(phrase) for phrase in phrases))


@dataclass(frozen=True)
class Rule:
    category: str
    # Every group must match; a group matches when any of its phrases does.
    groups: tuple[re.Pattern[str], ...]

    @classmethod
    def parse(cls, category: str, line: str) -> Rule:
        return cls(category, tuple(_alternatives(group, line) for group in line.split("&")))

    def matches(self, normalised: str) -> bool:
        return all(group.search(normalised) for group in self.groups)


class PromptPolicy:
    def __init__(self, rules: list[Rule], innocent: list[re.Pattern[str]] | None = None) -> None:
        self.rules = rules
        # Phrases that never count toward any rule, whichever categories are enforced.
        self.innocent = innocent or []

    @property
    def categories(self) -> list[str]:
        return sorted({rule.category for rule in self.rules})

    @classmethod
    def from_file(cls, path: Path | str = BUILTIN_BLOCKLIST, categories: list[str] | None = None) -> PromptPolicy:
        rules, innocent, category = [], [], None
        for number, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            if line.startswith("!"):
                try:
                    innocent.append(_alternatives(line[1:], line))
                except BlocklistError as exc:
                    raise BlocklistError(f"{path}:{number}: {exc}") from None
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
        policy = cls(rules, innocent)
        if categories:
            unknown = sorted(set(categories) - set(policy.categories))
            if unknown:
                raise BlocklistError(
                    f"unknown moderation categories {unknown}; {path} has: {', '.join(policy.categories)}"
                )
            policy = cls([rule for rule in rules if rule.category in categories], innocent)
        return policy

    def violation(self, prompt: str) -> str | None:
        """The category the prompt falls in, or None when it is allowed."""
        normalised = " ".join(words(prompt))
        for pattern in self.innocent:
            normalised = pattern.sub(_BLANK, normalised)
        for rule in self.rules:
            if rule.matches(normalised):
                return rule.category
        return None

"""The worked example's prompts: review openers, generated in code (8 openers x 6 subjects).

A pretrained model continues them as reviews, whose sentiment VADER scores (the gold reward).
The split into training and held-out prompts is a seeded shuffle, the same for every script.
"""

from __future__ import annotations

import random

OPENERS = (
    "The {} was",
    "I just tried the new {} and",
    "Honestly, the {}",
    "My review of the {}:",
    "Last night the {} was",
    "I have to say the {}",
    "Our {} turned out",
    "Everyone is talking about the {}, and",
)
SUBJECTS = ("movie", "hotel", "pizza", "phone", "concert", "book")
PROMPTS = tuple(opener.format(subject) for opener in OPENERS for subject in SUBJECTS)


def split(eval_count: int = 12, seed: int = 0) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts): 36 and 12 by default."""
    order = list(PROMPTS)
    random.Random(seed).shuffle(order)
    return sorted(order[eval_count:]), sorted(order[:eval_count])

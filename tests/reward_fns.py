"""Rewards for tests, imported by name through ``grpo.reward = "tests.reward_fns:<name>"``."""

from __future__ import annotations


def distinct_words(text: str, gold: tuple[str, ...]) -> float:
    """Number of distinct whitespace-separated words / 8: varies between the samples of an
    untrained model, so the policy-gradient term is not zero."""
    return len(set(text.split())) / 8.0


def not_a_number(text: str, gold: tuple[str, ...]) -> float:
    return float("nan")


def distinct_words_short_gold(text: str, gold: tuple[str, ...]) -> float:
    """``distinct_words`` for records with at most 2 gold codes, 0 for the others: their groups
    are flat, so grpo.filter_groups drops them and draws more."""
    return distinct_words(text, gold) if len(gold) <= 2 else 0.0

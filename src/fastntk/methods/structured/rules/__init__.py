"""Structured rules, one module per op family; adding a layer is adding a Rule here."""

from __future__ import annotations

from typing import Callable

import torch

from .base import Rule
from .conv import ConvRule
from .embedding import EmbeddingRule
from .linear import LinearRule
from .norm import BatchNormEvalRule, GroupNormRule, LayerNormRule

RULES: dict[Callable, Rule] = {}


def register(rule: Rule) -> Rule:
    """Make ``rule`` cover its functions."""
    for function in rule.functions:
        RULES[function] = rule
    return rule


for _rule in (LinearRule(), EmbeddingRule(), LayerNormRule(), GroupNormRule(), BatchNormEvalRule()):
    register(_rule)
for _conv in (torch.conv1d, torch.conv2d, torch.conv3d):
    register(ConvRule(_conv))

__all__ = ["RULES", "Rule", "register"]

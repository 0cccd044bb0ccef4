"""Alias of `configs/recurrentgemma.py:2b` (RecurrentGemma-2B, pretrained at 8192 tokens)."""

from configs import recurrentgemma


def get_config():
  return recurrentgemma.get_config("2b")

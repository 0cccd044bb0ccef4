"""Alias of `configs/recurrentgemma.py:9b` (RecurrentGemma-9B, pretrained at 8192 tokens)."""

from configs import recurrentgemma


def get_config():
  return recurrentgemma.get_config("9b")

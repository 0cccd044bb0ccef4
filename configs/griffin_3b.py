"""Alias of `configs/ladder.py:griffin,3b` (the Griffin paper's ladder, as a training recipe)."""

from configs import ladder


def get_config():
  return ladder.get_config("griffin,3b")

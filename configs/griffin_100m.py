"""Alias of `configs/ladder.py:griffin,100m` (the Griffin paper's ladder, as a training recipe)."""

from configs import ladder


def get_config():
  return ladder.get_config("griffin,100m")

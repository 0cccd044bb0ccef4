"""Alias of `configs/ladder.py:hawk,1b` (the Griffin paper's ladder, as a training recipe)."""

from configs import ladder


def get_config():
  return ladder.get_config("hawk,1b")

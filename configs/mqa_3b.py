"""MQA 3B of the Griffin paper's scaling ladder (see configs/ladder.py)."""

from configs import ladder


def get_config():
  return ladder.get_config("mqa", "3b")

"""Hawk 200M of the Griffin paper's scaling ladder (see configs/ladder.py)."""

from configs import ladder


def get_config():
  return ladder.get_config("hawk", "200m")

"""A file given as --config whose get_config() forgets to return (tests/test_cli.py)."""

from configs import base


def get_config():
  config = base.get_config()
  config.train.steps = 3

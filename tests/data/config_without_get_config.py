"""A file given as --config that defines no get_config() (tests/test_cli.py)."""

STEPS = 3

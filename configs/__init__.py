"""ml_collections experiment configs; `base.py` declares every field with its default."""

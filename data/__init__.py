"""The data pipeline: tokenizer, sources, packing, shards, streaming."""

import pretrain  # noqa: F401  (refuses `python -m data.<module>`: pretrain/__init__.py)

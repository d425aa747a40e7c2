"""Benchmark harnesses behind ``hfpatch bench``: ``speculative`` (speculative recipes against plain greedy and
transformers' prompt lookup) and ``longctx`` (sparse attention recipes against full attention), sharing
``common`` (tables, machine description, thread count, prompt encoding)."""

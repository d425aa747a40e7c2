"""The application layer: the ``hfpatch`` command line (``cli``), the demo, the benchmark harnesses (``bench``)
and the loaders of the offline assets (``assets``).

It is built on the library's public modules (``hfpatch.patch``, ``hfpatch.recipe``, ``hfpatch.compat`` ...);
the library never imports it.
"""

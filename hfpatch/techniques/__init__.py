"""Built-in techniques. Importing this package registers every one of them with `hfpatch.registry`."""

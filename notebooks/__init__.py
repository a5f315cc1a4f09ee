"""Makes notebooks/conftest.py import as notebooks.conftest, so it never shadows tests/conftest.py (both would
be the module "conftest" otherwise). The folder holds notebooks, not Python code."""

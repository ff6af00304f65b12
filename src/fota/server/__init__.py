"""The control center (CPython only)."""

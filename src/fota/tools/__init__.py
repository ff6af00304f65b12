"""Host-side tools (CPython only): signing keys, image packaging, CLI helpers."""

"""Defaults that `fota` commands show in their help, importable without what uses them (the
supervisor imports the device runner: 20-90 ms that every command paid to read one string)."""

# The heap an agent runs with unless told otherwise. Since the branches of 2026-11-27 the agent
# (TLS, a stalled or resumed download) no longer fits 128K on the 64-bit unix port: at 128K the
# first 2 KiB chunk after a resume failed with MemoryError nearly every time (a crash loop).
DEFAULT_HEAP = "160K"

# Release retention (fota release prune, fota.server.release_prune): the newest releases kept per
# hardware type and kind.
DEFAULT_RELEASE_KEEP = 3

# Garbage collection of blobs (fota release gc, and after fota release prune; fota.server.blob_gc):
# a blob nothing names is removed only once it is this many seconds old, since a release or a patch
# being made writes its blob before its row commits.
DEFAULT_BLOB_GRACE = 3600

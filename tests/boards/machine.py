# The emulated `machine` module lives in fota.testkit.boards (the emulations the tests, the benches
# and `fota demo --board esp32` share: docs/boards.md). Re-exported here for whoever puts
# tests/boards on the import path (with src/ on it too); a board process under the harnesses gets
# fota.testkit.boards itself on its MICROPYPATH.
from fota.testkit.boards.machine import *  # noqa: F401,F403

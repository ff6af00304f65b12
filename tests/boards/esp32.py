# The emulated `esp32` module lives in fota.testkit.boards (the emulations the tests, the benches
# and `fota demo --board esp32` share: docs/boards.md). Re-exported here for the tests that put
# tests/boards on the import path (with src/ on it too).
from fota.testkit.boards.esp32 import *  # noqa: F401,F403

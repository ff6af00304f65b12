# The emulated `esp32` module lives in fota.testkit.boards (the emulations the tests, the benches
# and `fota demo --board esp32` share: docs/boards.md), which is what to put on the path.
# Re-exported here for whoever puts tests/boards on it (with src/ too). Under CPython `import esp32`
# then gives the emulation's module itself, so that state set on it (setup(), the power-cut
# harness's power) is the emulation's; under MicroPython the first import gives this module, whose
# names are the emulation's but whose attributes set from outside are not.
import sys
from fota.testkit.boards import esp32 as _emulation
from fota.testkit.boards.esp32 import *  # noqa: F401,F403
sys.modules[__name__] = _emulation

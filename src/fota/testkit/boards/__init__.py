"""Emulated boards: MicroPython's board modules written from their documentation, and a harness
that plays a board's power and reset on this machine (docs/boards.md, "What the emulations
cover, and what only a real board can show").

Two kinds of module live here:

* MicroPython-side (run inside the real `micropython` unix port, never by the agent's own code):
  esp32.py (esp32.Partition and the bootloader's choice of app), machine.py and network.py (the
  board runner's machine.reset/WDT/unique_id and network.WLAN), poweron.py (what a board does
  from power-on to its main.py). The harness puts this directory on MICROPYPATH, so that
  `import esp32, machine, network` find them (a .py on the path shadows the unix port's own
  `machine`, which has no reset() or WDT).
* CPython-side: firmware.py (synthetic ESP app images whose frozen app is chosen by a tag) and
  harness.py (EmulatedBoard: the board's power, its resets and watchdog resets, its Wi-Fi).

This file stays importable under MicroPython: nothing here but this docstring.
"""

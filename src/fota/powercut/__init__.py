# Power-cut simulation of a device on the `sim` flash backend (docs/reliability.md):
# harness.py drives the real runner and core (MicroPython and CPython); scenario.py (CPython)
# prepares the signed updates it runs.

# The device agent. Every module in this package runs on MicroPython and on CPython:
# no typing, no dataclasses, no enum, no CPython-only stdlib.

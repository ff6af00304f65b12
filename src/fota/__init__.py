"""fota: signed firmware updates over MQTT for fleets of MicroPython devices.

This file must stay importable by MicroPython: the device agent lives in fota.device.
"""
__version__ = "0.1.0"

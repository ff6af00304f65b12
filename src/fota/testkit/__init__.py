"""What the tests and the benchmarks share (CPython only; never imported by shipped code).

A real Mosquitto with accounts (broker), a status spy on the server account (brokerspy), a
control center in a thread (center), real MicroPython devices under the supervisor (fleet), a
fault-injecting TCP proxy (faultproxy), what a device directory says (devices), lost statuses and
bricked devices (faults), throwaway SQLite and PostgreSQL
databases (databases), paho helpers that fail loudly (checked_mqtt), the device fuzz targets
(fuzzing) and the API's schemathesis run (apifuzz), the firmware corpus (corpus) and the delta
decoder under MicroPython (deltarun). Polling with a deadline is fota.tools.waiting: the demo
waits with it too.

tests/ and bench/ both import this package; tests/ imports nothing from bench/, and nothing under
fota.server, fota.device, fota.tools, fota.sim, fota.powercut or the CLI imports it
(tests/test_layout.py).
"""

"""Host-side tools (CPython only) that ship: keys and signing, app bundles, owner-only files, a
unix-port device's directory and its supervisor, the agent's .mpy build, collector settings.

Below the control center: nothing here imports fota.server or fota.testkit (tests/test_layout.py)."""

# Entry point: `micropython -m fota.device.main DEVICE_DIR` (unix port), or call main() from
# a board's main.py with the device directory.
import sys

from fota.device.runner import main

if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")

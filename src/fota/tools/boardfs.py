"""The files a provisioned board holds: one tree, written into a LittleFS image (fota device
provision --image, fota.tools.lfsimage) or copied onto a board by mpremote (--port,
fota.tools.boardport), so that the two cannot differ.

Layout (the board's filesystem root):
    /lib/fota/**.mpy   the agent (on sys.path of every MicroPython board port: '', .frozen, /lib)
    /device/           the device directory create_device_dir writes (config.json, boot.json, slots/)
    /main.py           starts the agent on device (relative: /device on a board)
    /boot.py           replaces whatever a previous owner left there (it runs before main.py)
The device directory is not /fota: '' precedes /lib on sys.path, so a /fota directory would
shadow the agent package.
"""
from __future__ import annotations

from pathlib import Path

DEVICE_DIR = "device"
AGENT_DIR = "lib/fota"

# The board runner's entry (fota.device.board: network bring-up, watchdog, machine.reset); the
# only place that names it (the emulated boards of fota.testkit.boards run it too). The device
# directory is relative: a board runs main.py with "/" as its working directory, and the runner
# makes the path absolute at start (fsutil.abspath), so this is /device on a board; the same
# file runs unchanged from a board tree copied anywhere else (the emulated board runs it in its
# filesystem's directory, where "/device" would be this machine's).
MAIN_PY = ("# Written by fota device provision: run the fota agent on the device directory.\n"
           "from fota.device.board import main\n"
           f"main(\"{DEVICE_DIR}\")\n")

# boot.py runs before main.py on every boot. A stock one only holds comments; one left by another
# application (starting WebREPL, or its own program) would run before the agent on every boot, so
# provisioning replaces it with one that does nothing.
BOOT_PY = ("# Written by fota device provision: nothing runs here. main.py starts the fota agent after\n"
           "# boot, with the REPL already up, so that mpremote can still interrupt it.\n")


def board_tree(device_dir: Path, agent_dir: Path) -> dict[str, bytes]:
    """path on the board (no leading /) -> content: the device directory under /device, the
    agent's .mpy under /lib, main.py and boot.py; an empty directory is "path/" -> b""."""
    tree = {}
    for path in sorted(Path(device_dir).rglob("*")):
        name = f"{DEVICE_DIR}/{path.relative_to(device_dir).as_posix()}"
        if path.is_file():
            tree[name] = path.read_bytes()
        elif not any(path.iterdir()):  # an empty directory (slots/b): "name/"
            tree[name + "/"] = b""
    for path in sorted((Path(agent_dir) / "fota").rglob("*.mpy")):
        tree[f"lib/{path.relative_to(agent_dir).as_posix()}"] = path.read_bytes()
    tree["main.py"] = MAIN_PY.encode()
    tree["boot.py"] = BOOT_PY.encode()
    return tree


def write_tree(tree: dict[str, bytes], root: Path) -> Path:
    """The tree as files under `root` (what mpremote copies from); private: it holds secrets."""
    from fota.tools.private import private_dir, write_private
    root = private_dir(Path(root))
    for name, data in tree.items():
        target = root / name
        if name.endswith("/"):
            private_dir(target)
            continue
        private_dir(target.parent)
        write_private(target, data)
    return root


def tree_dirs(tree: dict[str, bytes]) -> list[str]:
    """Every directory of the tree, parents first: each file's parents, and the empty
    directories ("device/slots/b/") themselves."""
    dirs = set()
    for name in tree:
        parts = name.rstrip("/").split("/")
        depth = len(parts) if name.endswith("/") else len(parts) - 1
        dirs.update("/".join(parts[:n]) for n in range(1, depth + 1))
    return sorted(dirs)


def tree_bytes(tree: dict[str, bytes], block: int = 4096) -> int:
    """Room the tree takes on a LittleFS filesystem of `block`-byte blocks, counted high: every
    file and directory a whole block at least (LittleFS stores a small file inline in its
    directory's block, so this is an upper bound)."""
    files = sum(max(1, -(-len(data) // block)) for name, data in tree.items() if not name.endswith("/"))
    return (files + len(tree_dirs(tree))) * block

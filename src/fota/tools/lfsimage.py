"""A board's filesystem as a LittleFS image (fota device provision --image), for factory
programming: the tree of fota.tools.boardfs (the device directory, the agent as .mpy for the
board, main.py and boot.py), the one --port copies onto a board with mpremote.
"""
from __future__ import annotations

from pathlib import Path

from fota.tools.boardfs import DEVICE_DIR, MAIN_PY, board_tree  # noqa: F401  (MAIN_PY: its one home is boardfs)


class ImageError(ValueError):
    """A board without a known filesystem layout, or a tree that does not fit the image."""


# Where MicroPython's stock firmware keeps its LittleFS filesystem, per board:
# board -> (filesystem offset in flash, its size, the command that writes an image there).
# esp32/esp32s3: ports/esp32/partitions-4MiB.csv (micropython/micropython), "vfs, data, fat,
#   0x200000, 0x200000" (4 MiB generic builds; the 8 MiB tables keep offset 0x200000 with a larger
#   size: pass --fs-size); flashbdev.py mounts the "vfs" partition with LittleFS v2.
# rp2: ports/rp2/boards/RPI_PICO_W/mpconfigboard.h, MICROPY_HW_FLASH_STORAGE_BYTES = 848 KiB at the
#   end of the 2 MiB flash (RPI_PICO without Wi-Fi: 1408 KiB: pass --fs-size 1441792), so the
#   filesystem starts at 0x200000 - size; picotool addresses flash through XIP base 0x10000000.
# Other boards (esp8266: its stock filesystem is FAT) are refused.
FLASH_LAYOUTS = {
    "esp32": {"offset": 0x200000, "size": 0x200000, "chip": "esp32"},
    "esp32s3": {"offset": 0x200000, "size": 0x200000, "chip": "esp32s3"},
    "rp2": {"flash": 0x200000, "size": 848 * 1024},
}
RP2_XIP_BASE = 0x10000000


def layout(board: str, fs_size: int | None = None) -> dict:
    """The filesystem's offset and size on the board (fs_size overrides the stock size)."""
    if board not in FLASH_LAYOUTS:
        raise ImageError(f"no LittleFS layout known for board {board!r}; images are built for: "
                         f"{', '.join(FLASH_LAYOUTS)}")
    known = dict(FLASH_LAYOUTS[board])
    size = fs_size or known["size"]
    if "flash" in known:  # rp2: the filesystem ends where the flash ends
        if size >= known["flash"]:
            raise ImageError(f"--fs-size {size} does not fit a {known['flash']}-byte flash")
        known["offset"] = known["flash"] - size
    known["size"] = size
    return known


def write_command(board: str, image: Path, fs_size: int | None = None, port: str = "PORT") -> str:
    """The command line that writes the image at the filesystem's offset."""
    where = layout(board, fs_size)
    if board == "rp2":
        return f"picotool load -v -t bin -o {hex(RP2_XIP_BASE + where['offset'])} {image}"
    return f"esptool.py --chip {where['chip']} --port {port} write_flash {hex(where['offset'])} {image}"


def image_tree(board: str, device_dir: Path, agent_dir: Path) -> dict[str, bytes]:
    """The image's files (fota.tools.boardfs.board_tree: the same for every board)."""
    return board_tree(device_dir, agent_dir)


def build_image(tree: dict[str, bytes], size: int, block_size: int = 4096) -> bytes:
    """A LittleFS (v2, as MicroPython mounts it) image of `size` bytes holding the tree; empty
    directories of the device directory (slots/b) are kept."""
    from littlefs import LittleFS
    from littlefs.errors import LittleFSError
    if size % block_size:
        raise ImageError(f"filesystem size {size} is not a multiple of the block size {block_size}")
    fs = LittleFS(block_size=block_size, block_count=size // block_size)
    try:
        for name, data in tree.items():
            _makedirs(fs, name.rpartition("/")[0])
            if name.endswith("/"):
                continue
            with fs.open(name, "wb") as f:
                f.write(data)
    except LittleFSError as e:
        if e.code == LittleFSError.Error.LFS_ERR_NOSPC:
            raise ImageError(f"the tree ({sum(map(len, tree.values()))} bytes) does not fit {size} bytes: "
                             "raise --fs-size") from e
        raise
    return bytes(fs.context.buffer)


def _makedirs(fs, path: str) -> None:
    done = ""
    for part in filter(None, path.split("/")):
        done = f"{done}/{part}" if done else part
        try:
            fs.mkdir(done)
        except FileExistsError:
            pass


def read_image(data: bytes, block_size: int = 4096) -> dict[str, bytes]:
    """The files of an image (tests, and checking an image before writing it)."""
    from littlefs import LittleFS
    fs = LittleFS(block_size=block_size, block_count=len(data) // block_size, mount=False)
    fs.context.buffer = bytearray(data)
    fs.mount()
    files = {}
    for root, _dirs, names in fs.walk("/"):
        for name in names:
            path = f"{root.rstrip('/')}/{name}".lstrip("/")
            with fs.open(path, "rb") as f:
                files[path] = f.read()
    return files

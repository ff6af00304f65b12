# An emulated MicroPython board on a serial line, for running the real `mpremote` without
# hardware: the REPL's raw mode and raw-paste mode, served on stdin/stdout (the master side of a
# pty, tests/boards/serial_board.py), with a directory as the board's filesystem. Runs under the
# real `micropython` (unix port), so the code mpremote sends (its fs commands, fota's probe) is
# executed by MicroPython itself, against VfsPosix mounted at "/". Never part of the agent.
#
#   micropython rawrepl.py ROOT PLATFORM LOG [--no-raw-paste] [--free BYTES]
#
# Written from the documentation, not from code:
# - MicroPython, "The MicroPython Interactive Interpreter Mode (aka REPL)", sections "Raw mode
#   and raw-paste mode" and "Soft reset":
#   https://docs.micropython.org/en/latest/reference/repl.html#raw-mode-and-raw-paste-mode
#   Ctrl-A enters raw mode (the board answers "raw REPL; CTRL-B to exit\r\n>"), Ctrl-B returns
#   to the friendly REPL, Ctrl-C interrupts, Ctrl-D on an empty line soft-resets. In raw mode
#   the code is sent without echo and ended by Ctrl-D; the board answers "OK", runs it, and
#   sends its output, Ctrl-D, the exception text if any, Ctrl-D, then the ">" prompt again.
#   Raw-paste mode: in raw mode, Ctrl-E "A" Ctrl-A asks for it; "R\x00" means understood but
#   not supported, "R\x01" supported, followed by a 16-bit little-endian window-size increment.
#   The host may send that many bytes; the board sends Ctrl-A each time it can take another
#   window; the host ends the code with Ctrl-D, which the board acknowledges with Ctrl-D before
#   compiling and running it (output, Ctrl-D, errors, Ctrl-D as in raw mode).
# - MicroPython, vfs module: https://docs.micropython.org/en/latest/library/vfs.html
#   vfs.VfsPosix(root) (unix port) is a filesystem on a host directory; vfs.mount/umount.
# - MicroPython, machine.reset(): https://docs.micropython.org/en/latest/library/machine.html
#   a hard reset, like pushing the reset button: the RAM (the REPL's globals) is lost.
#
# What it does not emulate: the board's firmware (sys.platform is reported as PLATFORM, every
# other sys attribute is the unix port's; with --free, os.statvfs("/") reports that many free
# bytes in 4096-byte blocks, as a small flash filesystem would, but writes are not limited), running boot.py/main.py after a reset, USB
# re-enumeration, flash wear. Each hard reset is appended to LOG (outside ROOT) as "reset".
import sys
import os
import vfs

CTRL_A, CTRL_B, CTRL_C, CTRL_D, CTRL_E = 1, 2, 3, 4, 5
WINDOW = 128  # raw-paste window-size increment (bytes)

root, platform, log_path = sys.argv[1], sys.argv[2], sys.argv[3]
raw_paste = "--no-raw-paste" not in sys.argv
free = int(sys.argv[sys.argv.index("--free") + 1]) if "--free" in sys.argv else None
log = open(log_path, "a")  # opened before "/" becomes the board's filesystem
vfs.umount("/")
vfs.mount(vfs.VfsPosix(root), "/")
os.chdir("/")

real_sys = sys
rd = sys.stdin.buffer
wr = sys.stdout.buffer


def note(event):
    log.write(event + "\n")
    log.flush()


class HardReset(Exception):
    pass


class BoardSys:
    """`import sys` on the board: the board's port name, the unix port's everything else."""
    platform = platform

    def __getattr__(self, name):
        return getattr(real_sys, name)


class BoardOs:
    """`import os` on the board: the unix port's, with the free space of --free."""
    def statvfs(self, path):
        v = real_os.statvfs(path)
        if free is None:
            return v
        return (4096, 4096, v[2], free // 4096, free // 4096) + tuple(v[5:])

    def __getattr__(self, name):
        return getattr(real_os, name)


real_os = os


class Machine:
    """The `machine` module, as far as mpremote's reset uses it."""
    @staticmethod
    def reset():
        raise HardReset()


def fresh_globals():
    return {"__name__": "__main__"}


def read1():
    b = rd.read(1)
    if not b:
        raise SystemExit(0)  # the line is gone
    return b[0]


def execute(code, g):
    """Run code as the raw REPL does: output, Ctrl-D, exception text, Ctrl-D."""
    sys.modules["sys"] = BoardSys()
    sys.modules["os"] = BoardOs()
    sys.modules["machine"] = Machine
    try:
        exec(code, g)
    except HardReset:
        raise
    except BaseException as e:  # the board reports every exception and stays up
        wr.write(b"\x04")
        real_sys.print_exception(e, real_sys.stdout)
        wr.write(b"\x04")
        return
    finally:
        sys.modules["sys"] = real_sys
        sys.modules["os"] = real_os
    wr.write(b"\x04\x04")


def raw_paste_receive():
    """Code received in raw-paste mode, with its flow control (None: the host aborted)."""
    wr.write(b"R\x01" + bytes([WINDOW & 0xFF, WINDOW >> 8]))
    code = bytearray()
    room = WINDOW
    while True:
        c = read1()
        if c == CTRL_D:
            wr.write(b"\x04")
            return bytes(code)
        if c == CTRL_C:
            return None
        code.append(c)
        room -= 1
        if room == 0:
            room = WINDOW
            wr.write(b"\x01")


def raw_repl(g):
    """Raw mode until Ctrl-B: returns the globals (a soft reset replaces them)."""
    wr.write(b"raw REPL; CTRL-B to exit\r\n>")
    code = bytearray()
    while True:
        c = read1()
        if c == CTRL_B:
            wr.write(b"\r\nMicroPython (emulated board) on " + platform.encode() + b"\r\n>>> ")
            return g
        if c == CTRL_A:  # asked again: the banner again, the line cleared
            code = bytearray()
            wr.write(b"\r\nraw REPL; CTRL-B to exit\r\n>")
        elif c == CTRL_C:
            code = bytearray()
        elif c == CTRL_D and not code:
            note("soft reset")
            g = fresh_globals()
            wr.write(b"MPY: soft reboot\r\n")
            wr.write(b"raw REPL; CTRL-B to exit\r\n>")
        elif c == CTRL_D:
            wr.write(b"OK")
            execute(bytes(code).decode(), g)
            code = bytearray()
            wr.write(b">")
        elif c == CTRL_E and not code:
            if read1() != ord("A") or read1() != CTRL_A:
                continue
            if not raw_paste:
                wr.write(b"R\x00")
                continue
            received = raw_paste_receive()
            if received is not None:
                execute(received.decode(), g)
            wr.write(b">")
        else:
            code.append(c)


def friendly_repl():
    g = fresh_globals()
    wr.write(b"MicroPython (emulated board) on " + platform.encode() + b"\r\n>>> ")
    while True:
        c = read1()
        if c == CTRL_A:
            g = raw_repl(g)
        elif c == CTRL_D:
            note("soft reset")
            g = fresh_globals()
            wr.write(b"MPY: soft reboot\r\n>>> ")
        elif c in (CTRL_C, 13):
            wr.write(b"\r\n>>> ")
        # anything else typed at the friendly prompt is not needed by mpremote's commands


while True:
    try:
        friendly_repl()
    except HardReset:
        note("reset")

"""Output shared by the benchmarks: one table printer (Rich, plain text without it)."""
from __future__ import annotations


def print_table(title: str, columns, rows, notes=(), left=("result", "module", "note")) -> None:
    """Columns named in `left` are left-aligned (text); the others right-aligned (numbers)."""
    rows = [[str(v) for v in r] for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text
        print(f"\n{title}")
        widths = [max(len(str(c)), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
        print("  ".join(str(c).ljust(w) for c, w in zip(columns, widths)))
        for r in rows:
            print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
    else:
        t = Table(title=title)
        for c in columns:
            t.add_column(str(c), justify="left" if c in left else "right", overflow="fold")
        for r in rows:
            t.add_row(*r)
        Console(width=160).print(t)
    for note in notes:
        print(note)

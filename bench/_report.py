"""Output shared by the benchmarks: one table printer (Rich, plain text without it), and the ending of
a bench whose result carries its own verdicts (`failures`)."""
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


def write_and_judge(result: dict, out, render, failures) -> int:
    """Add the verdicts (failures(result): a list of problems) to result, write it as JSON to out,
    show it with render(result), print each problem; the exit status: 1 if any, else 0."""
    import json
    result["failures"] = failures(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    render(result)
    print(f"\nJSON: {out}")
    for problem in result["failures"]:
        print("FAILED:", problem)
    return 1 if result["failures"] else 0

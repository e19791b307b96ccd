"""Plain aligned text tables for the terminal (registry, datasets and jobs listings)."""

from __future__ import annotations

from typing import Any


def format_table(rows: list[dict[str, Any]], columns: list[str],
                 max_width: int | None = 48) -> str:
    """A plain aligned text table of `rows` (cells longer than `max_width` lose their
    middle to an ellipsis; None: never, for what a user pastes into a command)."""
    def cell(v: Any) -> str:
        s = "-" if v is None or v == "" else str(v)
        s = s.replace("\n", " ")
        if max_width is None or len(s) <= max_width:
            return s
        # Cut the middle: the start and the end of paths and messages say the most.
        head = (max_width - 1) // 2
        return s[:head] + "…" + s[len(s) - (max_width - 1 - head):]

    table = [[c.upper().replace("_", " ") for c in columns]]
    table += [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip()
                     for row in table)

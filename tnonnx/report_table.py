"""Tables that fit the console: on a narrow one, the least essential columns are left out
(they stay in the JSON) and long layer names keep their distinctive end (`…/fc1/Gemm`)."""

from __future__ import annotations

from dataclasses import dataclass

from rich.table import Table

NAME_MIN = 14  # a layer name is never cut shorter than this
WRAP_MIN = 10  # columns that may wrap (notes) are counted at this width when fitting


@dataclass
class Column:
    header: str
    justify: str = "left"
    group: str | None = None  # columns left out together on a narrow console ("MACs": before and after)
    wrap: bool = False  # may wrap onto several lines (notes)
    name: bool = False  # layer names: shortened from the left
    short_header: bool = False  # the header may wrap at its spaces ("output err" over two lines)

    def needs(self, cells: list[str], name_cap: int) -> int:
        """The width this column needs at least, as fit_table counts it."""
        head = max(map(len, self.header.split())) if self.short_header or self.wrap else len(self.header)
        widest = max(map(len, cells), default=0)
        if self.wrap:
            widest = min(widest, WRAP_MIN)
        if self.name:
            widest = max((len(shorten(c, name_cap)) for c in cells), default=0)
        return max(head, widest)


def shorten(name: str, limit: int) -> str:
    """`name` in at most `limit` characters, keeping its end (the distinctive part)."""
    if len(name) <= limit:
        return name
    tail = name[-(limit - 1):]
    cut = tail.find("/")  # start at a path component where one is close
    if 0 < cut < len(tail) - NAME_MIN // 2:
        tail = tail[cut:]
    return "…" + tail


def fit_table(title: str, columns: list[Column], rows: list[list[str]], width: int | None,
              drop_order: tuple[str, ...], n_essential: int = 0) -> tuple[Table, list[str]]:
    """A rich Table of `rows` no wider than `width` (None: as wide as it needs): groups in
    `drop_order` are left out while it is too wide; layer names are shortened (keeping their
    end) before the last `n_essential` groups go, and after. Returns the table and the
    groups left out."""
    keep = list(range(len(columns)))
    dropped: list[str] = []
    name_cap = max((len(r[i]) for r in rows for i, c in enumerate(columns) if c.name), default=NAME_MIN)

    def needed() -> int:
        return 1 + sum(columns[i].needs([r[i] for r in rows], name_cap) + 3 for i in keep)

    if width is not None:
        # the less essential groups first, then shorter names, then the rest of `drop_order`
        essential = drop_order[len(drop_order) - n_essential:] if n_essential else ()
        for group in drop_order:
            if group in essential:
                while needed() > width and name_cap > NAME_MIN:
                    name_cap -= 1
            if needed() <= width:
                break
            if any(columns[i].group == group for i in keep):
                keep = [i for i in keep if columns[i].group != group]
                dropped.append(group)
        while needed() > width and name_cap > NAME_MIN:
            name_cap -= 1
    table = Table(title=title)
    shown = [[shorten(r[i], name_cap) if columns[i].name else r[i] for i in keep] for r in rows]
    for j, i in enumerate(keep):
        c = columns[i]
        longest = max((len(r[j]) for r in shown), default=0)
        table.add_column(c.header, justify=c.justify, no_wrap=not c.wrap and not c.name,
                         overflow="fold", min_width=longest if c.name else None)
    for r in shown:
        table.add_row(*r)
    return table, dropped


def legend(dropped: list[str], width: int | None, where: str) -> str | None:
    """The line saying which columns a narrow console left out, and where they are."""
    if not dropped:
        return None
    return f"left out at {width} columns: {', '.join(dropped)} (all in {where}; a wider terminal shows them)"

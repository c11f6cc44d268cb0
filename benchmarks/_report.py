"""Turn measured figures into markdown: the targets summary and one table per workload."""

from __future__ import annotations

from collections.abc import Sequence

import attrs


@attrs.frozen(kw_only=True)
class Target:
    """One claim checked against one measured figure.

    `ratio` is what was measured (a ratio or a plain value), `threshold` what the issue asks for,
    `higher_is_better` which side of it passes. `ratio` None means the figure could not be taken.
    """

    workload: str
    claim: str
    ratio: float | None
    threshold: float
    higher_is_better: bool = True
    unit: str = "x"
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.ratio is None:
            return None
        if self.higher_is_better:
            return self.ratio >= self.threshold
        return self.ratio <= self.threshold


@attrs.frozen(kw_only=True)
class Section:
    """The results of one workload: a detail table, notes, and the targets it checks."""

    title: str
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    targets: tuple[Target, ...] = ()
    notes: tuple[str, ...] = ()


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table, columns padded so it also reads well as plain text."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), separator, *(line(row) for row in rows)])


def _verdict(target: Target) -> str:
    met = target.met
    return "n/a" if met is None else ("yes" if met else "**NO**")


def _figure(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:.1f} {unit}"


def targets_table(sections: Sequence[Section]) -> str:
    """The summary: every target of every workload, the measured figure and whether it is met."""
    rows = []
    for section in sections:
        for target in section.targets:
            sign = ">=" if target.higher_is_better else "<="
            rows.append(
                (
                    target.workload,
                    target.claim,
                    _figure(target.ratio, target.unit),
                    f"{sign} {_figure(target.threshold, target.unit)}",
                    _verdict(target),
                    target.note,
                )
            )
    return table(("workload", "claim", "measured", "target", "met", "note"), rows)


def render(
    *, machine: dict[str, str], sections: Sequence[Section], mode: str, preface: Sequence[str] = ()
) -> str:
    """The whole report: machine, targets summary, then each workload's table and notes."""
    parts = [f"# Benchmark results ({mode} mode)", ""]
    parts += [*preface, ""] if preface else []
    parts += ["## Machine", "", table(("", ""), list(machine.items())), ""]
    parts += ["## Targets", "", targets_table(sections), ""]
    for section in sections:
        parts += [f"## {section.title}", "", table(section.headers, section.rows), ""]
        for note in section.notes:
            parts += [note, ""]
    return "\n".join(parts).rstrip() + "\n"


def mb(size: float) -> str:
    """Bytes as MB with one decimal."""
    return f"{size / 1e6:.1f} MB"


def ms(seconds: float) -> str:
    """Seconds as milliseconds with one decimal."""
    return f"{seconds * 1000:.1f} ms"

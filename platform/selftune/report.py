"""What the CLI prints: stage headers while running, the per-stage table at the end."""

from __future__ import annotations

from typing import Any, Sequence


def stage_header(index: int, total: int, stage: Any) -> str:
    return f"\n▶ stage {index + 1}/{total}: {stage.name} ({stage.kind})"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line("-" * w for w in widths), *(line(row) for row in rows)])


def _number(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if percent else f"{value:.4f}"


OPTIMISTIC = ("val mIoU: each stage's best epoch was chosen on val itself (data.selection: val, the papers' "
              "protocol), so these numbers are optimistic; --set data.selection=20 holds out 20 val images to choose on")


def selects_on_val(stages) -> bool:
    """Whether the best epochs were chosen on the reported val images themselves."""
    chosen = [s.summary for s in stages if "select/miou" in s.summary]
    return bool(chosen) and all(summary["select/miou"] == summary.get("val/miou") for summary in chosen)


def stage_rows(stages, *, with_selection: bool = False) -> list[list[str]]:
    return [
        [
            s.name, s.kind,
            *([_number(s.summary.get("select/miou"))] if with_selection else []),
            _number(s.summary.get("val/miou")),
            _number(s.summary.get("pseudo_label/miou")),
            _number(s.summary.get("pseudo_label/kept_fraction"), percent=True),
            f"{s.seconds:.1f}s",
        ]
        for s in stages
    ]


def print_stage_table(result) -> None:
    on_val = selects_on_val(result.stages)
    headers = ["stage", "kind", *([] if on_val else ["select mIoU"]), "val mIoU", "pseudo-label mIoU", "kept %", "wall time"]
    print("\n" + format_table(headers, stage_rows(result.stages, with_selection=not on_val)))
    if on_val:
        print(OPTIMISTIC)

"""The dataset doctor's findings and their three renderings: terminal table, JSON, HTML."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

Severity = Literal["error", "warning", "info"]
SEVERITY_ORDER: dict[str, int] = {"error": 0, "warning": 1, "info": 2}
THUMBNAIL_SIDE = 128
TERMINAL_ITEMS_SHOWN = 10


@dataclass
class Finding:
    """One check's result: what is wrong, where (image paths or row sources), and whether it blocks training."""

    check: str
    severity: Severity
    message: str
    items: list[str] = field(default_factory=list)
    blocking: bool = False
    notes: dict[str, str] = field(default_factory=dict)  # item -> detail ("truncated", "cut: …")


def noted_finding(check: str, severity: Severity, message: str, notes: dict[str, str], blocking: bool = False) -> Finding | None:
    """A finding over the items in `notes` (item -> detail), or None when nothing was noted."""
    return Finding(check, severity, message, list(notes), blocking, notes) if notes else None


@dataclass
class Report:
    """All findings of a dataset check, summary numbers, and the image file behind each item."""

    findings: list[Finding]
    stats: dict[str, Any] = field(default_factory=dict)
    image_paths: dict[str, Path] = field(default_factory=dict)  # item -> image, for thumbnails

    @property
    def has_blocking(self) -> bool:
        """True when some finding must be fixed before training (the CLI exits non-zero)."""
        return any(finding.blocking for finding in self.findings)

    def finding(self, check: str) -> Finding | None:
        """The finding of `check`, or None if that check found nothing."""
        return next((finding for finding in self.findings if finding.check == check), None)

    def sorted_findings(self) -> list[Finding]:
        return sorted(self.findings, key=lambda finding: (SEVERITY_ORDER[finding.severity], finding.check))

    def summary_line(self) -> str:
        """One line for the start of training: counts per check, and where to see details."""
        if not self.findings:
            return "data check: no problems found"
        parts = ", ".join(f"{f.check}: {len(f.items) or 1}" for f in self.sorted_findings() if f.severity != "info")
        return f"data check: {parts or 'notes only'} (details: lora-scripts check-data --config …)"

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict: findings (most severe first), stats, and `blocking`."""
        return {
            "blocking": self.has_blocking,
            "findings": [asdict(finding) for finding in self.sorted_findings()],
            "stats": self.stats,
        }

    def format_terminal(self) -> str:
        """A plain-text table: one block per finding with up to 10 items and their notes."""
        lines = [_summary_line(self)]
        for finding in self.sorted_findings():
            label = finding.severity.upper() + (" (blocking)" if finding.blocking else "")
            count = f" ({len(finding.items)})" if finding.items else ""
            lines.append(f"\n{label:<18} {finding.check}{count}: {finding.message}")
            width = max((len(item) for item in finding.items[:TERMINAL_ITEMS_SHOWN]), default=0)
            for item in finding.items[:TERMINAL_ITEMS_SHOWN]:
                lines.append(f"    {item:<{width}}  {finding.notes.get(item, '')}".rstrip())
            if len(finding.items) > TERMINAL_ITEMS_SHOWN:
                lines.append(f"    ... and {len(finding.items) - TERMINAL_ITEMS_SHOWN} more (see --json or --html)")
        top_tags = _top_tags(self.stats.get("tag_frequency", {}))
        if top_tags:
            lines.append("\nMost frequent tags: " + ", ".join(f"{tag} x{count}" for tag, count in top_tags))
        blocking = sum(finding.blocking for finding in self.findings)
        lines.append(f"\n{blocking} blocking finding(s)." if blocking else "\nNo blocking findings.")
        return "\n".join(lines)

    def write_html(self, path: Path) -> None:
        """Write a self-contained HTML page, with embedded thumbnails of flagged images."""
        thumbnails: dict[Path, str | None] = {}
        sections = []
        for finding in self.sorted_findings():
            cards = []
            for item in finding.items:
                image_path = self.image_paths.get(item)
                if image_path is not None and image_path not in thumbnails:
                    thumbnails[image_path] = _thumbnail_data_uri(image_path)
                uri = thumbnails.get(image_path) if image_path is not None else None
                picture = f'<img src="{uri}" alt="{html.escape(item)}">' if uri else '<div class="none">no preview</div>'
                note = html.escape(finding.notes.get(item, ""))
                cards.append(f'<figure>{picture}<figcaption><b>{html.escape(item)}</b><br>{note}</figcaption></figure>')
            blocking = " blocking" if finding.blocking else ""
            sections.append(
                f'<section class="{finding.severity}"><h2>{finding.severity}{blocking}: {html.escape(finding.check)}'
                f' ({len(finding.items)})</h2><p>{html.escape(finding.message)}</p>'
                f'<div class="grid">{"".join(cards)}</div></section>'
            )
        stats = "".join(
            f"<tr><th>{html.escape(key)}</th><td>{html.escape(str(value))}</td></tr>"
            for key, value in self.stats.items() if key != "tag_frequency"
        )
        tags = "".join(f"<tr><td>{html.escape(tag)}</td><td>{count}</td></tr>" for tag, count in _top_tags(self.stats.get("tag_frequency", {}), 50))
        page = (
            f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Dataset check</title><style>{_CSS}</style></head>"
            f"<body><h1>Dataset check</h1><p>{html.escape(_summary_line(self))}</p><table>{stats}</table>"
            f"{''.join(sections)}<h2>Tag frequency</h2><table>{tags}</table></body></html>"
        )
        path.write_text(page, encoding="utf-8")


_CSS = (
    "body{font-family:sans-serif;margin:2em}section{border-left:6px solid #999;padding:0 1em;margin:1em 0}"
    ".error{border-color:#c00}.warning{border-color:#e90}.info{border-color:#39c}"
    ".grid{display:flex;flex-wrap:wrap;gap:8px}figure{width:160px;margin:0;font-size:12px;word-break:break-all}"
    "figure img{max-width:128px;max-height:128px}.none{width:128px;height:64px;background:#eee;color:#888}"
    "th{text-align:left;padding-right:1em}"
)


def _summary_line(report: Report) -> str:
    counts = {severity: sum(f.severity == severity for f in report.findings) for severity in SEVERITY_ORDER}
    images = report.stats.get("images", report.stats.get("samples", "?"))
    return f"Checked {images} item(s): {counts['error']} error(s), {counts['warning']} warning(s), {counts['info']} note(s)."


def _top_tags(tag_frequency: dict[str, dict[str, int]], limit: int = 15) -> list[tuple[str, int]]:
    totals: dict[str, int] = {}
    for tags in tag_frequency.values():
        for tag, count in tags.items():
            totals[tag] = totals.get(tag, 0) + count
    return sorted(totals.items(), key=lambda pair: (-pair[1], pair[0]))[:limit]


def _thumbnail_data_uri(path: Path) -> str | None:
    """A ~128px JPEG of the image as a data: URI, or None if Pillow cannot read it."""
    try:
        with Image.open(path) as image:
            image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG", quality=80)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")

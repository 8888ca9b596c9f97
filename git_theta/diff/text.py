"""Text rendering of a diff dict (see :mod:`git_theta.diff.compare`): aligned tables, colour on request.

Colour is decided by the caller (a terminal, ``--color``, git's pager); this module only applies
ANSI codes when told to, and measures column widths without them.
"""

_CODES = {"bold": "1", "red": "31", "green": "32", "yellow": "33", "cyan": "36", "dim": "2"}
_MARK = {"changed": ("~", "yellow"), "added": ("+", "green"), "removed": ("-", "red"), "renamed": (">", "cyan")}
_LETTER = {"changed": "M", "added": "A", "removed": "D", "renamed": "R"}


class Style:
    """Applies ANSI colour codes only when ``color`` is true."""

    def __init__(self, color=False):
        self.color = color

    def __call__(self, text, *styles):
        if not self.color or not styles or not text:
            return text
        codes = ";".join(_CODES[s] for s in styles if s)
        return f"\x1b[{codes}m{text}\x1b[0m" if codes else text


def number(x, kind="g"):
    """A number for a table: None -> '-', ratios in scientific notation, percentages, cosines."""
    if x is None:
        return "-"
    if kind == "pct":
        return f"{100 * x:.1f}%" if x == 0 or x >= 0.001 else f"{100 * x:.1e}%"
    if kind == "cos":
        return f"{x:.6f}"
    if kind == "int":
        return str(x)
    return f"{x:.3e}" if x != 0 else "0"


def shape_text(shape):
    return "[" + ",".join(str(d) for d in shape) + "]"


def table(rows, right=(), style=None, indent="  "):
    """Lines of an aligned table. ``rows`` are lists of cells: text or (text, style names...)."""
    style = style or Style()
    cells = [[c if isinstance(c, tuple) else (c,) for c in row] for row in rows]
    widths = {}
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths.get(i, 0), len(c[0]))
    lines = []
    for row in cells:
        out = []
        for i, c in enumerate(row):
            text = c[0]
            pad = widths[i] - len(text)
            last = i == len(row) - 1
            # Right-align numeric columns, but not a row's last cell when the row is shorter
            # than the header (a word like "removed" in place of the numbers).
            align_right = i in right and (len(row) == len(cells[0]) or not last)
            padded = (
                (" " * pad + style(text, *c[1:]))
                if align_right
                else (style(text, *c[1:]) + ("" if last else " " * pad))
            )
            out.append(padded)
        lines.append((indent + "  ".join(out)).rstrip())
    return lines


def describe(t):
    """The type/shape column of a tensor record."""
    old, new = t["old"], t["new"]
    if old is None or new is None:
        side = old or new
        return f"{side['dtype']} {shape_text(side['shape'])}"
    dtype = old["dtype"] if old["dtype"] == new["dtype"] else f"{old['dtype']}->{new['dtype']}"
    shape = (
        shape_text(old["shape"])
        if old["shape"] == new["shape"]
        else f"{shape_text(old['shape'])}->{shape_text(new['shape'])}"
    )
    return f"{dtype} {shape}"


def _name(t):
    return f"{t['old_name']} -> {t['name']}" if t["status"] == "renamed" else t["name"]


def _counts(summary):
    parts = [f"{summary[k]} {k}" for k in ("changed", "added", "removed", "renamed") if summary.get(k)]
    parts.append(f"{summary['unchanged']} unchanged")
    return ", ".join(parts)


def layout_text(f):
    """The layout line of a model entry ("re-sharded 8 -> 5 files, 0 tensors changed"), or None."""
    change = f.get("layout")
    if not change or not change["resharded"]:
        return None
    moved = f", {change['moved']} moved" if change["moved"] and change["files_old"] == change["files_new"] else ""
    n = f["summary"]["changed"]
    return (
        f"re-sharded {change['files_old']} -> {change['files_new']} files{moved}, "
        f"{n} tensor{'s' if n != 1 else ''} changed"
    )


def _model_note(f):
    if f.get("kind") != "model":
        return ""
    files = len(f["shards_new"] or f["shards_old"])
    note = f" (model, {files} file{'s' if files != 1 else ''}"
    return note + (f", adapter of {f['adapter_of']})" if f.get("adapter_of") else ")")


def _file_title(f, style):
    if f["status"] == "renamed":
        title = f"{f['old_path']} -> {f['path']}"
    else:
        title = f["path"]
    s = f["summary"]
    tag = {"added": " (new file)", "removed": " (deleted file)", "renamed": " (renamed)"}.get(f["status"], "")
    return (
        style(f"{title}{tag}", "bold")
        + _model_note(f)
        + f"  {f['format'] or '?'}, {s['tensors_old']} -> {s['tensors_new']} tensors"
    )


def render(diff, style=None, max_rows=None):
    """The full text diff: per file a summary, the changed tensors and the changed layers/blocks."""
    style = style or Style()
    lines = []
    for f in diff["files"]:
        if lines:
            lines.append("")
        lines.append(_file_title(f, style))
        for problem in f.get("problems", []):
            lines.append("  " + style(f"warning: {problem}", "red"))
        s = f["summary"]
        line = "  " + _counts(s)
        if s["relative_change"] is not None:
            line += f"; rel.change {number(s['relative_change'])}"
        if s["fraction_changed"] is not None and s["elements_compared"]:
            line += f"; {number(s['fraction_changed'], 'pct')} of compared elements changed"
        lines.append(line)
        if layout_text(f):
            lines.append("  " + layout_text(f))
        if f.get("fields_changed"):
            lines.append("  file fields changed: " + ", ".join(f["fields_changed"]))
        tensors = f["tensors"] if max_rows is None else f["tensors"][:max_rows]
        if tensors:
            rows = [
                [
                    ("",),
                    ("tensor", "dim"),
                    ("type", "dim"),
                    ("l2(delta)", "dim"),
                    ("rel.change", "dim"),
                    ("max|delta|", "dim"),
                    ("cosine", "dim"),
                    ("changed", "dim"),
                ]
            ]
            for t in tensors:
                mark, colour = _MARK[t["status"]]
                st = t["stats"]
                row = [(mark, colour), (_name(t), colour if t["status"] != "changed" else None), describe(t)]
                if st is not None:
                    row += [
                        number(st["delta_l2"]),
                        number(st["relative_change"]),
                        number(st["max_abs_delta"]),
                        number(st["cosine"], "cos"),
                        number(st["fraction_changed"], "pct"),
                    ]
                elif t["status"] == "changed" and t["shape_changed"]:
                    row += ["shape changed"]
                elif t["status"] != "changed":
                    row += [t["status"]]
                rows.append(row)
            lines.append("")
            lines.extend(table(rows, right=(3, 4, 5, 6, 7), style=style))
            if max_rows is not None and len(f["tensors"]) > max_rows:
                lines.append(f"  ... and {len(f['tensors']) - max_rows} more")
        if len(f["groups"]) > 1:
            rows = [
                [
                    ("layer/block", "dim"),
                    ("changed", "dim"),
                    ("added", "dim"),
                    ("removed", "dim"),
                    ("l2(delta)", "dim"),
                    ("rel.change", "dim"),
                    ("elements changed", "dim"),
                ]
            ]
            for g in f["groups"]:
                rows.append(
                    [
                        g["name"],
                        f"{g['changed']}/{g['tensors_new']}",
                        str(g["added"]),
                        str(g["removed"]),
                        number(g["delta_l2"]),
                        number(g["relative_change"]),
                        number(g["fraction_changed"], "pct") if g["elements_compared"] else "-",
                    ]
                )
            lines.append("")
            lines.extend(table(rows, right=(1, 2, 3, 4, 5, 6), style=style))
    if not diff["files"]:
        lines.append("no tensor changes")
    return "\n".join(lines)


def render_stat(diff, style=None):
    """``--stat``: per file the counts, then one line per differing tensor (no numbers)."""
    style = style or Style()
    lines = []
    totals = {"changed": 0, "added": 0, "removed": 0, "renamed": 0}
    for f in diff["files"]:
        s = f["summary"]
        for k in totals:
            totals[k] += s[k]
        title = f"{f['old_path']} -> {f['path']}" if f["status"] == "renamed" else f["path"]
        tag = {"added": "new file, ", "removed": "deleted, ", "renamed": "renamed, "}.get(f["status"], "")
        lines.append(
            f" {style(title, 'bold')}{_model_note(f)} | {tag}{_counts(s)} ({s['tensors_old']} -> {s['tensors_new']} tensors)"
        )
        if layout_text(f):
            lines.append(f"     {layout_text(f)}")
        for t in f["tensors"]:
            mark, colour = _LETTER[t["status"]], _MARK[t["status"]][1]
            extra = ""
            if t["dtype_changed"] or t["shape_changed"]:
                extra = f"  ({describe(t)})"
            lines.append(f"     {style(mark, colour)} {_name(t)}{extra}")
        for problem in f.get("problems", []):
            lines.append("     " + style(f"warning: {problem}", "red"))
    n = len(diff["files"])
    if n:
        parts = [f"{v} tensor{'s' if v != 1 else ''} {k}" for k, v in totals.items() if v]
        unit = "model" if diff.get("by") == "model" else "file"
        lines.append(f" {n} {unit}{'s' if n != 1 else ''} changed" + (", " + ", ".join(parts) if parts else ""))
    else:
        lines.append("no tensor changes")
    return "\n".join(lines)

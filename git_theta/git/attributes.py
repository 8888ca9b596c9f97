"""Editing ``.gitattributes`` for ``git theta track`` / ``untrack``.

A tracked pattern gets ``filter=theta diff=theta merge=theta -text``. An existing line for the same
pattern is rewritten in place (replacing, say, Git LFS's ``filter=lfs``) and keeps its other
attributes; untrack removes only git-theta's attributes and drops lines left empty.
"""

from pathlib import Path

from git_theta.errors import UsageError

OURS = ("filter=theta", "diff=theta", "merge=theta", "-text")


def _quote(pattern):
    if any(c.isspace() for c in pattern) or pattern.startswith('"'):
        escaped = pattern.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    return pattern


def _split(line):
    """(pattern, [attributes]) of a non-comment line, or None."""
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    if stripped.startswith('"'):
        end = 1
        while end < len(stripped) and stripped[end] != '"':
            end += 2 if stripped[end] == "\\" else 1
        pattern = stripped[: end + 1]
        rest = stripped[end + 1 :]
    else:
        pattern, _, rest = stripped.partition(" ")
        if "\t" in pattern:
            pattern, _, more = pattern.partition("\t")
            rest = more + " " + rest
    return pattern, rest.split()


def _owned(attr):
    key = attr.lstrip("-!").split("=", 1)[0]
    return key in ("filter", "diff", "merge", "text")


def _read(path):
    return path.read_text().splitlines() if path.exists() else []


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


def track(work_tree, patterns):
    """Add or update lines for ``patterns``; return the patterns that changed."""
    path = Path(work_tree) / ".gitattributes"
    lines = _read(path)
    changed = []
    for pattern in patterns:
        if not pattern or "\n" in pattern:
            raise UsageError(f"invalid pattern {pattern!r}")
        quoted = _quote(pattern)
        found = False
        for i, line in enumerate(lines):
            parsed = _split(line)
            if parsed and parsed[0] == quoted:
                found = True
                kept = [a for a in parsed[1] if not _owned(a)]
                new = " ".join([quoted, *OURS, *kept])
                if new != line:
                    lines[i] = new
                    changed.append(pattern)
        if not found:
            lines.append(" ".join([quoted, *OURS]))
            changed.append(pattern)
    if changed:
        _write(path, lines)
    return changed


def untrack(work_tree, patterns):
    """Remove git-theta's attributes from lines of ``patterns``; return the patterns that changed."""
    path = Path(work_tree) / ".gitattributes"
    lines = _read(path)
    changed, out = [], []
    wanted = {_quote(p): p for p in patterns}
    for line in lines:
        parsed = _split(line)
        if parsed and parsed[0] in wanted and any(a in OURS for a in parsed[1]):
            changed.append(wanted[parsed[0]])
            kept = [a for a in parsed[1] if a not in OURS]
            if kept:
                out.append(" ".join([parsed[0], *kept]))
            continue
        out.append(line)
    if changed:
        _write(path, out)
    return changed


def tracked_patterns(work_tree):
    """Patterns in the root ``.gitattributes`` that carry ``filter=theta``."""
    result = []
    for line in _read(Path(work_tree) / ".gitattributes"):
        parsed = _split(line)
        if parsed and "filter=theta" in parsed[1]:
            result.append(parsed[0])
    return result

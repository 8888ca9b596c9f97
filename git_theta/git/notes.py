"""How a merge was chosen, kept with the merge commit: JSON git notes under ``refs/notes/theta``.

``git theta merge --search`` and ``--operator auto`` write the record; ``git theta log`` reads it.
It lives here, beside the rest of the code that runs git, so the log reads it without loading the
merge search.
"""

import json

NOTES_REF = "refs/notes/theta"


def add_note(repo, commit, data):
    """Attach ``data`` (JSON) to ``commit`` under :data:`NOTES_REF` (replacing an older note)."""
    repo.git(
        "notes",
        f"--ref={NOTES_REF}",
        "add",
        "-f",
        "-F",
        "-",
        commit,
        input=(json.dumps(data, indent=1) + "\n").encode(),
    )


def read_note(repo, commit):
    """The search/auto record attached to ``commit`` (a dict), or None when it has none or it is not ours."""
    raw = repo.git("notes", f"--ref={NOTES_REF}", "show", commit, check=False)
    try:
        data = json.loads(raw.decode("utf-8", "replace")) if raw.strip() else None
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) and data.get("schema") == 1 else None


def note_summary(data):
    """One line saying how a merge was chosen, from :func:`read_note`'s record."""
    chosen = data.get("chosen") or {}
    params = " ".join(f"{k}={v}" for k, v in sorted((chosen.get("params") or {}).items()))
    recipe = " ".join(filter(None, [str(chosen.get("operator", "?")), params]))
    rows = data.get("candidates") or []
    scored = sum(1 for r in rows if isinstance(r, dict) and r.get("status") == "ok")
    order = chosen.get("branches")
    where = f", branches {', '.join(map(str, order))}" if order else ""
    score = chosen.get("score", (data.get("chosen_score")))
    shown = f" score {score:.4g}," if isinstance(score, (int, float)) else ""
    return f"chosen by {data.get('chosen_by', '?')}: {recipe}{where} ({shown} {scored} of {len(rows)} candidates scored)".replace(
        "( ", "("
    )

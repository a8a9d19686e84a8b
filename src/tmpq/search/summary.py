"""Reading a finished search's summary (RUN/search.json), checked, with one clear error when it is not one."""

from __future__ import annotations

import json
from pathlib import Path

from tmpq.errors import TmpqError
from tmpq.serialization import FORMAT_VERSION, VERSION_KEY

SUMMARY_FILE = "search.json"


def read_summary(source: str | Path, fix: str = "run `tmpq search` or `tmpq run` there first") -> dict:
    """The search.json of a finished search (a run directory or the file itself). `fix` is what the error tells
    the user to do when there is none (it differs by command)."""
    path = Path(source)
    path = path / SUMMARY_FILE if path.is_dir() else path
    if not path.is_file():
        raise TmpqError(f"{source} holds no finished search (no {SUMMARY_FILE}); {fix}")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        d, why = None, f"not valid JSON: {e}"
    else:
        why = "no best candidate or config"
    if not isinstance(d, dict) or "best" not in d or not isinstance(d.get("config"), dict):
        raise TmpqError(
            f"{path} is not a tmpq search result ({why}); re-run the same search command to rewrite it, or {fix}"
        )
    version = d.get(VERSION_KEY, FORMAT_VERSION)  # files from before the key existed are format 1
    if version != FORMAT_VERSION:
        raise TmpqError(
            f"{path} is a search result of format {version}; this tmpq reads format {FORMAT_VERSION}: use the tmpq "
            "version that wrote it, or re-run the search with this one"
        )
    return d

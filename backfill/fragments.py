"""Author SQL stays one expression: a lexical check of the fragments a spec carries (SET expressions, the filter).

The batch statements put each fragment between parentheses, ``SET col = (...)`` and ``WHERE ... AND (...)``. A
fragment that closes that parenthesis early (``a IS NULL) OR (true``), ends the statement (``;``), opens a comment
that swallows the closing parenthesis (``/* ...``), or leaves a quote open escapes it, and PostgreSQL would still
accept the statement it makes: the filter would then cover the whole table, or a SET would write the key. Wrapping
cannot be proved safe by asking PostgreSQL to parse the result (the escaped statement parses too), so the fragment
is scanned here the way PostgreSQL's lexer reads it, with ``standard_conforming_strings`` on (pinned on every
connection): quotes, quoted identifiers, dollar quotes and comments are skipped over, and every parenthesis outside
them must be closed inside the fragment, none closed that it did not open. A ``-- comment`` running to the end of the
fragment is fine: the statements put a line break before the closing parenthesis.
"""

from __future__ import annotations

import re

__all__ = ["FragmentError", "fragment_problem", "ends_in_line_comment"]

# An identifier character as PostgreSQL's lexer sees it (any non-ASCII byte counts).
_IDENT_CHAR = re.compile(r"[A-Za-z0-9_$\x80-\U0010ffff]")
_DOLLAR_TAG = re.compile(r"\$([A-Za-z_\x80-\U0010ffff][A-Za-z0-9_\x80-\U0010ffff]*)?\$")


class FragmentError(ValueError):
    """Internal: a fragment is not one expression (the caller names the fragment and raises its own error)."""


def _string_end(text: str, start: int, backslashes: bool) -> int:
    """Index just past the string literal whose opening quote is at ``start``."""
    i = start + 1
    while i < len(text):
        c = text[i]
        if backslashes and c == "\\":
            i += 2
            continue
        if c == "'":
            if i + 1 < len(text) and text[i + 1] == "'":
                i += 2
                continue
            return i + 1
        i += 1
    raise FragmentError("a quote (') is never closed")


def _scan(text: str) -> bool:
    """Walk ``text`` as PostgreSQL's lexer does; raise :class:`FragmentError` if it is not self-contained.
    Returns whether the last token is a ``--`` comment with no line break after it."""
    depth, i, n = 0, 0, len(text)
    trailing_comment = False
    while i < n:
        c = text[i]
        starts_token = i == 0 or not _IDENT_CHAR.match(text[i - 1])
        trailing_comment = False
        if c == "-" and text.startswith("--", i):
            end = min((j for j in (text.find("\n", i), text.find("\r", i)) if j >= 0), default=-1)
            if end < 0:
                trailing_comment = True
                i = n
            else:
                i = end + 1
            continue
        if c == "/" and text.startswith("/*", i):
            # Block comments nest in PostgreSQL.
            level, i = 1, i + 2
            while level:
                if i >= n:
                    raise FragmentError("a comment (/*) is never closed")
                if text.startswith("/*", i):
                    level, i = level + 1, i + 2
                elif text.startswith("*/", i):
                    level, i = level - 1, i + 2
                else:
                    i += 1
            continue
        if c == "'":
            i = _string_end(text, i, backslashes=False)
            continue
        if starts_token and c in "eE" and text.startswith("'", i + 1):
            i = _string_end(text, i + 1, backslashes=True)
            continue
        if c == '"':
            end = i + 1
            while True:
                end = text.find('"', end)
                if end < 0:
                    raise FragmentError('a quoted identifier (") is never closed')
                if text.startswith('""', end):
                    end += 2
                    continue
                break
            i = end + 1
            continue
        if c == "$" and starts_token:
            match = _DOLLAR_TAG.match(text, i)
            if match:
                end = text.find(match.group(0), match.end())
                if end < 0:
                    raise FragmentError(f"a dollar quote ({match.group(0)}) is never closed")
                i = end + len(match.group(0))
                continue
        if c == ";":
            raise FragmentError("a ';' ends the statement: write one expression")
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth < 0:
                raise FragmentError("a ')' closes a parenthesis the fragment did not open")
        i += 1
    if depth:
        raise FragmentError("a '(' is never closed")
    return trailing_comment


def fragment_problem(text: str) -> str | None:
    """Why ``text`` is not one self-contained SQL expression (None if it is), as ``syntax error: ...``."""
    try:
        _scan(text)
    except FragmentError as exc:
        return f"syntax error: {exc}"
    return None


def ends_in_line_comment(text: str) -> bool:
    """Whether a ``--`` comment runs to the end of ``text`` (so a parenthesis after it needs a line break first).
    Only meaningful for text :func:`fragment_problem` accepts."""
    try:
        return _scan(text)
    except FragmentError:
        return False

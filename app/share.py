"""Shareable views: a page's main settings round-trip through the URL's query string.

A page lists its settings as :class:`Param` objects (widget key, short URL name, parser) and calls
:func:`sync` once *before* its widgets are drawn and once *after* (``sync(params)`` returns a callable
that publishes). Before: values found in the URL that differ from what this session last published
are copied into ``st.session_state`` (so an opened link sets the widgets, while later changes by the
user win). After: the current widget values are written to ``st.query_params``, so the address bar
always reproduces the view. A value in the URL that does not parse is skipped with a warning naming
it. Streamlit clears the query string when the page changes; each page then publishes its own.

What lives here: the URL mechanism and small parsers. What does not: which settings a page shares
(each page declares its own list).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import streamlit as st

_SEEN = "_jem_url_seen"  # session_state: {scope: {name: published string}}
#: The scope whose settings (the sidebar's model, baseline, dataset) belong in every page's link.
SHARED_SCOPE = "sidebar"


@dataclass(frozen=True)
class Param:
    """One shared setting.

    Attributes:
        key: the widget's key in ``st.session_state``; also its name in the URL (``?key=value``). Keys are
            prefixed by their page (``lg_``, ``rb_``, ...), so names never clash across pages.
        parse: string from the URL -> widget value; raises ``ValueError`` for a value the widget cannot take.
        format: widget value -> string for the URL.
    """

    key: str
    parse: Callable[[str], Any]
    format: Callable[[Any], str] = str

    @property
    def name(self) -> str:
        return self.key


def choice(options: Sequence[Any]) -> Callable[[str], Any]:
    """Parser for a widget with fixed options: the option whose ``str()`` is the URL string."""
    table = {str(o): o for o in options}

    def parse(s: str) -> Any:
        if s not in table:
            raise ValueError(f"{s!r} is not one of {', '.join(table)}")
        return table[s]
    return parse


def number(kind: type, lo: float, hi: float) -> Callable[[str], Any]:
    """Parser for a number widget: ``kind`` (int or float) in ``[lo, hi]``. Raises ValueError naming the
    problem: not a number, outside the range, or (for int) not a whole number."""
    def parse(s: str) -> Any:
        try:
            v = float(s)
        except ValueError:
            raise ValueError(f"{s!r} is not a number") from None
        if not (math.isfinite(v) and lo <= v <= hi):
            raise ValueError(f"{s} is outside [{lo}, {hi}]")
        if kind is int:
            if v != int(v):
                raise ValueError(f"{s} is not a whole number")
            return int(v)
        return kind(v)
    return parse


def flag(s: str) -> bool:
    """Parser for a toggle: ``1``/``true``/``on`` or ``0``/``false``/``off``."""
    v = s.strip().lower()
    if v in ("1", "true", "on", "yes"):
        return True
    if v in ("0", "false", "off", "no"):
        return False
    raise ValueError(f"{s!r} is not on/off (use 1 or 0)")


def format_flag(v: Any) -> str:
    return "1" if v else "0"


class PartlyIgnored(ValueError):
    """A URL value of which only a part can be used: ``value`` is that part; the message says what was left out."""

    def __init__(self, value: Any, message: str):
        super().__init__(message)
        self.value = value


def several(options: Sequence[Any]) -> Callable[[str], list]:
    """Parser for a multiselect: comma-separated options (an empty string is an empty choice). Parts that are not
    options raise :class:`PartlyIgnored` carrying the others, so the link's valid choices are still applied."""
    one = choice(options)

    def parse(s: str) -> list:
        kept, ignored = [], []
        for part in filter(None, s.split(",")):
            try:
                kept.append(one(part))
            except ValueError:
                ignored.append(repr(part))
        if ignored:
            raise PartlyIgnored(kept, f"{', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} not among "
                                      f"{', '.join(map(str, options))}")
        return kept
    return parse


def format_several(v: Any) -> str:
    return ",".join(str(x) for x in v)


def sync(params: Sequence[Param], scope: str) -> Callable[[], None]:
    """Apply the URL's values of ``params`` to ``st.session_state``; return the function that publishes.

    Args:
        params: the settings of one page (or of the sidebar).
        scope: a name for the set (the page's name, or :data:`SHARED_SCOPE` for the sidebar's settings,
            which stay in every page's link; another page's settings are removed from the URL).

    Returns:
        ``publish()``: call it after the widgets are drawn to write their values into the URL. Its attribute
        ``applied`` holds the keys whose values this run took from the link (for a page that must still refuse
        one, e.g. a baseline that does not fit the model, and say so).
    """
    seen = st.session_state.setdefault(_SEEN, {})
    last = seen.get(scope, {})
    applied = set()
    for p in params:
        raw = st.query_params.get(p.name)
        if raw is None or last.get(p.name) == raw:
            continue
        try:
            st.session_state[p.key] = p.parse(raw)
            applied.add(p.key)
        except PartlyIgnored as e:
            st.session_state[p.key] = e.value
            applied.add(p.key)
            st.warning(f"Part of the link's setting {p.name}={raw!r} was ignored: {e}.")
        except (ValueError, TypeError) as e:
            st.warning(f"The link's setting {p.name}={raw!r} was ignored: {e}.")
        last[p.name] = raw  # applied (or refused) once; the user's later changes win

    def publish() -> None:
        out = {}
        for p in params:
            if p.key in st.session_state:
                out[p.name] = p.format(st.session_state[p.key])
        for other, names in seen.items():  # another page's settings do not belong in this page's link
            if other not in (scope, SHARED_SCOPE):
                for name in names:
                    if name in st.query_params and name not in out:
                        del st.query_params[name]
        for name, value in out.items():
            if st.query_params.get(name) != value:
                st.query_params[name] = value
        seen[scope] = {**last, **out}
    publish.applied = frozenset(applied)
    return publish

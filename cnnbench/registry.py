"""One small generic registry: ``@REG.register`` keyed by function name, ``REG.create``."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any


class UnknownNameError(KeyError):
    """An unknown registry key; the message says what is available."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


def did_you_mean(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """`` did you mean 'x'?`` or an empty string."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f" did you mean '{close[0]}'?" if close else ""


class Registry:
    """Maps names to factories. ``kind`` is used in messages ("unknown model 'x'")."""

    def __init__(self, kind: str, fallback: Callable[[str], Callable | None] | None = None, fallback_hint: str = "",
                 any_case: bool = False):
        """``fallback(name)`` may supply a factory for a name that is not registered (e.g. any torch.optim class).
        ``any_case``: names (and ``aliases``) are found whatever their case, as users type torch's class names."""
        self.kind = kind
        self._entries: dict[str, Callable[..., Any]] = {}
        self._info: dict[str, dict[str, Any]] = {}
        self._aliases: dict[str, str] = {}  # lower-case name or alias → registered key (any_case only)
        self._fallback, self._fallback_hint, self._any_case = fallback, fallback_hint, any_case

    def register(self, fn: Callable | None = None, *, name: str | None = None, aliases: tuple[str, ...] = (), **info: Any):
        """Register ``fn`` under its ``__name__`` (or ``name``) and its ``aliases``; extra ``info`` is kept for listings."""

        def deco(f: Callable) -> Callable:
            key = name or f.__name__
            if key in self._entries:
                raise ValueError(f"{self.kind} '{key}' is registered twice")
            self._entries[key] = f
            self._info[key] = {"doc": (f.__doc__ or "").strip().split("\n")[0], **info}
            if self._any_case:
                self._aliases.update({n.lower(): key for n in (key, *aliases)})
            return f

        return deco(fn) if fn is not None else deco

    def _key(self, name: str) -> str | None:
        """The registered key ``name`` stands for (None: not registered; the fallback may still know it)."""
        if name in self._entries:
            return name
        return self._aliases.get(str(name).lower()) if self._any_case else None

    @property
    def fallback_hint(self) -> str:
        """What else the fallback accepts, in words (empty without a fallback)."""
        return self._fallback_hint

    def names(self) -> list[str]:
        return sorted(self._entries)

    def info(self, name: str) -> dict[str, Any]:
        fn = self.get(name)
        return self._info.get(self._key(name) or name) or {"doc": (fn.__doc__ or "").strip().split("\n")[0]}

    def __contains__(self, name: object) -> bool:
        return self._key(str(name)) is not None or (self._fallback is not None and self._fallback(str(name)) is not None)

    def unknown_message(self, name: str) -> str:
        hint = f" {self._fallback_hint}" if self._fallback_hint else ""
        return f"unknown {self.kind} '{name}';{did_you_mean(name, self.names())} available: {', '.join(self.names())}{hint}"

    def get(self, name: str) -> Callable[..., Any]:
        key = self._key(name)
        if key is not None:
            return self._entries[key]
        found = self._fallback(name) if self._fallback is not None else None
        if found is None:
            raise UnknownNameError(self.unknown_message(name))
        return found

    def create(self, name: str, **kwargs: Any) -> Any:
        """Call the factory; ``None`` values are dropped so factory defaults apply."""
        return self.get(name)(**{k: v for k, v in kwargs.items() if v is not None})

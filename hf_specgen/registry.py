"""Named entries that a higher package registers into a lower one, so that the lower one looks them up by name
without importing the higher one (the tiny foundations register their evaluation suites into `hf_specgen.eval`
and their reward rule into `hf_specgen.alignment`).

A registry names its provider modules as strings and imports them on the first lookup, as transformers' auto
classes name their model modules (and setuptools entry points name a plugin's module): whichever module a caller
imported first, every entry is known when a name is looked up, and the import graph keeps pointing one way.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Generic, TypeVar


T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """A read-only mapping of names to entries, filled by `register`.

    Args:
        kind: what an entry is, for messages (e.g. "LM suite").
        providers: modules (dotted names) that register entries when imported; each is imported once, on the
            first lookup (`registry[name]`, `name in registry`, iteration, `len`) or registration.
        entries: the registry's own entries, known from the start (registered without importing the providers,
            so that the module defining the registry need not be complete when a provider imports it).
    """

    def __init__(self, kind: str, providers: Iterable[str] = (), entries: Mapping[str, T] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, T] = dict(entries or {})
        self._providers = list(providers)

    def register(self, name: str, entry: T) -> T:
        """Adds `entry` under `name`.

        Args:
            name: the name callers look it up by.
            entry: what they get.

        Returns:
            `entry`, so that `register` can decorate a function or class.

        Raises:
            ValueError: `name` is registered already to another entry (the providers' entries included).
        """
        self._load_providers()
        if name in self._entries and self._entries[name] != entry:
            raise ValueError(f"{self.kind} {name!r} is registered already: {self._entries[name]!r}")
        self._entries[name] = entry
        return entry

    def _load_providers(self) -> None:
        while self._providers:  # popped first: a provider that looks a name up while it registers does not recurse
            provider = self._providers.pop(0)
            try:
                importlib.import_module(provider)
            except BaseException:
                self._providers.insert(0, provider)
                raise

    def __getitem__(self, name: str) -> T:
        self._load_providers()
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        self._load_providers()
        return iter(self._entries)

    def __len__(self) -> int:
        self._load_providers()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self)})"

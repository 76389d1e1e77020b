"""Secret values never reach a record.

Runbooks take references to secrets (``vault_*`` names), not values; still, a value can reach
a notebook (printed, returned, in a traceback, passed as a parameter by mistake). Before a record
is stored, every secret value the environment knows is replaced by ``[secret:<name>]`` in every
string of the notebook, the ledger entry and the HTML (rendered from the redacted notebook),
and then once more in the serialized bytes, in each form the serializers may have written it
(as is or Python-repr-escaped, each of those HTML-escaped, and all of them JSON-escaped).
"""

from __future__ import annotations

import html
import json
from typing import Any


class Redactor:
    def __init__(self, secrets: dict[str, str]):
        # Longest first, so a secret that contains another is replaced whole.
        self.secrets = sorted(
            ((name, str(value)) for name, value in secrets.items() if value not in (None, "")),
            key=lambda item: -len(item[1]),
        )

    def __bool__(self) -> bool:
        return bool(self.secrets)

    @staticmethod
    def marker(name: str) -> str:
        return f"[secret:{name}]"

    @staticmethod
    def _forms(value: str) -> list[str]:
        """The value as text may hold it (as is, repr-escaped as in a traceback, HTML-escaped),
        and each of those as a JSON string holds it."""
        plain = {value, repr(value)[1:-1]}
        text_forms = plain | {html.escape(f, quote=q) for f in plain for q in (True, False)}
        forms = set(text_forms)
        for form in text_forms:
            forms.add(json.dumps(form)[1:-1])
            forms.add(json.dumps(form, ensure_ascii=False)[1:-1])
        return sorted(forms, key=len, reverse=True)

    def text(self, s: str) -> str:
        for name, value in self.secrets:
            for form in self._forms(value):
                if form in s:
                    s = s.replace(form, self.marker(name))
        return s

    def obj(self, o: Any) -> Any:
        """A copy of a JSON-like value (dicts, lists, notebook nodes) with secrets replaced."""
        if isinstance(o, str):
            return self.text(o)
        if isinstance(o, dict):
            return type(o)((self.text(k), self.obj(v)) for k, v in o.items())
        if isinstance(o, list | tuple):
            return type(o)(self.obj(v) for v in o)
        return o

    def bytes(self, data: bytes) -> bytes:
        for name, value in self.secrets:
            marker = self.marker(name).encode()
            for form in self._forms(value):
                data = data.replace(form.encode(), marker)
        return data

    def leaks(self, data: bytes) -> list[str]:
        """Names of the secrets whose value appears in these bytes in any form."""
        return [
            name for name, value in self.secrets if any(form.encode() in data for form in self._forms(value))
        ]

"""A custom import-linter contract: no import of an external *subpackage* (``torch.nn``).

import-linter's own ``forbidden`` contract accepts external packages only as a whole (``torch``), yet
``solvers`` may use torch's tensors and must not use ``torch.nn``.  This contract reads the import
statements grimp records for the external package and refuses those that name the subpackage.
Registered in ``pyproject.toml`` (``contract_types``); ``lint-imports`` runs it in CI.
"""

from __future__ import annotations

import re

from importlinter.application import output
from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck


class ForbiddenSubpackageContract(Contract):
    """Options: ``source_modules`` (packages checked, with their descendants) and ``forbidden``
    (dotted names of external subpackages, e.g. ``torch.nn``)."""

    type_name = "forbidden_subpackage"

    source_modules = fields.ListField(subfield=fields.StringField())
    forbidden = fields.ListField(subfield=fields.StringField())

    def check(self, graph, verbose: bool) -> ContractCheck:
        found = []
        for source in self.source_modules:  # type: ignore[attr-defined]
            modules = {source} | set(graph.find_descendants(source))
            for name in self.forbidden:  # type: ignore[attr-defined]
                top, _, rest = name.partition(".")
                last = rest.rpartition(".")[2]
                parent = name.rpartition(".")[0]
                pattern = re.compile(rf"\bimport {re.escape(name)}\b|\bfrom {re.escape(name)}\b"
                                     rf"|\bfrom {re.escape(parent)} import .*\b{re.escape(last)}\b")
                for module in sorted(modules):
                    for detail in graph.get_import_details(importer=module, imported=top):
                        if pattern.search(detail["line_contents"]):
                            found.append((module, detail["line_number"], detail["line_contents"], name))
        return ContractCheck(kept=not found, warnings=[], metadata={"found": found})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for module, line, text, name in check.metadata["found"]:
            output.print_error(f"{module} (l.{line}) imports {name}: {text}")

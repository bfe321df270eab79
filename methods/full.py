"""``full``: no compression; the reference every method is measured against."""
from dataclasses import dataclass
from typing import ClassVar

from kvbench.method import Method


@dataclass
class Full(Method):
    """Keeps every token. The budget is ignored (always 1.0)."""

    uses_budget: ClassVar[bool] = False
    budget: float | int = 1.0

    def keeps_everything(self) -> bool:
        return True

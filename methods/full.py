"""``full``: no compression; the reference every method is measured against."""
from dataclasses import dataclass

from kvbench.method import Method


@dataclass
class Full(Method):
    """Keeps every token. The budget is ignored (always 1.0)."""

    budget: float | int = 1.0

    def keeps_everything(self) -> bool:
        return True

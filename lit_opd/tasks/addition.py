"""Multi-digit addition: ``"347+85="`` → ``"432"``.

Chosen for the quickstart because a character-level transformer must learn carries to solve it:
a 4-layer model trained for a couple of minutes on CPU solves it, a smaller briefly warm-started
one does not, and exact match is an unambiguous verifier.

With ``reverse_answer=True`` the sum is written least-significant digit first (``"234"``), the
order in which carries are written by hand; it is far easier for a left-to-right model.
"""

from __future__ import annotations

import random

from lit_opd.errors import SettingError
from lit_opd.tasks.base import Task


class AdditionTask(Task):
    """Sums of two non-negative integers with ``min_digits``..``max_digits`` digits each.

    Args:
        min_digits: fewest digits per operand.
        max_digits: most digits per operand.
        reverse_answer: write the sum least-significant digit first.
    """

    def __init__(self, min_digits: int = 1, max_digits: int = 3, reverse_answer: bool = False) -> None:
        if not 1 <= min_digits <= max_digits:
            raise SettingError(
                f"{type(self).__name__} needs 1 <= min_digits <= max_digits, got min_digits={min_digits}, "
                f"max_digits={max_digits}"
            )
        self.min_digits = min_digits
        self.max_digits = max_digits
        self.reverse_answer = reverse_answer

    def _operand(self, rng: random.Random) -> int:
        digits = rng.randint(self.min_digits, self.max_digits)
        return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)

    def make_rows(self, num_rows: int, seed: int) -> list[dict]:
        rng = random.Random(seed)
        rows = []
        for _ in range(num_rows):
            a, b = self._operand(rng), self._operand(rng)
            rows.append({"prompt": f"{a}+{b}=", "answer": self.answer(a, b)})
        return rows

    def answer(self, a: int, b: int) -> str:
        """The reference answer for ``a+b``."""
        answer = str(a + b)
        return answer[::-1] if self.reverse_answer else answer

    def verify(self, completion: str, answer: str | None) -> bool:
        return answer is not None and completion.strip() == answer

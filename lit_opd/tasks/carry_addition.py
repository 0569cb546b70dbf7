"""Addition that shows its work: ``"347+85="`` → ``"7+5+0=12|4+8+1=13|3+0+1=04|432"``.

Answers are long enough (about 20-40 characters for 2-4 digit operands) for methods that judge a
completion chunk by chunk, such as OmniOPD. The trace goes column by column from the least
significant digit; a column ``a+b+c=ts`` adds the two digits (0 where an operand has run out) and
the carry in ``c``, and writes the two-digit sum ``ts``: its tens digit ``t`` is the carry into the
next column, its units digit ``s`` the result digit. After the last ``|`` comes the sum, most
significant digit first.

Every column has the same nine-character shape, so a small model learns the format quickly, and
each carry is a fork: one wrong column sum passes a wrong carry on, and every later column and the
final result go wrong with it. The verifier compares the text after the last ``|`` with the sum
(``strict=True`` compares the whole trace instead).

:func:`carry_bpe_tokenizer` trains a small BPE tokenizer on this text, a different segmentation for
a teacher that only exchanges text with a character-level student.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lit_opd.errors import SettingError
from lit_opd.tasks.addition import AdditionTask
from lit_opd.tasks.tokenizer import SPECIAL_TOKENS

SEPARATOR = "|"


def carry_trace(a: int, b: int) -> str:
    """The full answer for ``a+b``: one ``x+y+c=ts`` column per digit of the longer operand, then
    ``|`` and the sum."""
    if a < 0 or b < 0:
        raise SettingError(f"carry_trace needs non-negative operands, got {a} and {b}")
    xs, ys = str(a)[::-1], str(b)[::-1]
    columns, carry = [], 0
    for i in range(max(len(xs), len(ys))):
        x = int(xs[i]) if i < len(xs) else 0
        y = int(ys[i]) if i < len(ys) else 0
        total = x + y + carry
        columns.append(f"{x}+{y}+{carry}={total:02d}")
        carry = total // 10
    return SEPARATOR.join([*columns, str(a + b)])


def final_result(text: str) -> str:
    """What follows the last separator (the whole text when there is none), stripped."""
    return text.strip().rsplit(SEPARATOR, 1)[-1].strip()


class CarryAdditionTask(AdditionTask):
    """Sums of two non-negative integers of ``min_digits``..``max_digits`` digits each, answered with
    the column-by-column carry trace of :func:`carry_trace`.

    Args:
        min_digits: fewest digits per operand.
        max_digits: most digits per operand.
        strict: the verifier also requires every column of the trace to match, not only the sum.
    """

    def __init__(self, min_digits: int = 2, max_digits: int = 4, strict: bool = False) -> None:
        # The operands are AdditionTask's (same seeded draws); only the answer and verifier differ.
        super().__init__(min_digits, max_digits, reverse_answer=False)
        self.strict = strict

    def answer(self, a: int, b: int) -> str:
        return carry_trace(a, b)

    def verify(self, completion: str, answer: str | None) -> bool:
        if answer is None:
            return False
        if self.strict:
            return completion.strip() == answer.strip()
        return final_result(completion) == final_result(answer)


def carry_bpe_tokenizer(
    vocab_size: int = 160, num_rows: int = 20000, seed: int = 0, min_digits: int = 2, max_digits: int = 4,
    dropout: float | None = None,
) -> PreTrainedTokenizerFast:
    """A BPE tokenizer trained on ``num_rows`` prompts and answers of the task.

    Ids 0-3 are pad/unk/bos/eos as in the character tokenizer, then every printable ASCII character
    (so any text round-trips), then merges learnt from the task text: ``+0``, ``+5+0``, two-digit
    sums and the like. ``=`` and ``|`` are always tokens of their own, so a prompt and its answer
    encode the same way apart or together. The same arguments give the same tokenizer.

    ``dropout`` (BPE dropout) skips each merge with that probability at every encode, so one text gets
    many segmentations: train on it, and the model learns to continue text cut inside a token (as a
    text-only method cuts a student's answer); save the tokenizer without it for inference.
    """
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[=|\s]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=list(string.printable),
        limit_alphabet=len(string.printable), show_progress=False,
    )
    rows = CarryAdditionTask(min_digits, max_digits).make_rows(num_rows, seed)
    backend.train_from_iterator((row["prompt"] + row["answer"] for row in rows), trainer=trainer)
    backend.model.dropout = dropout
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )
    tok.padding_side = "left"
    return tok

"""The embedded default task, generated on the machine: digit arithmetic modulo 5 (or another
`modulus` up to 10) in one of three forms.

chain (the default): a digit and `hops` operations, each ending with "=" and applied to the value the
line has so far; the answer, the value after the last "=", ends the line. The intermediate values are
never written, so a model reads each one where it computed it, at that operation's "=":

    prompt  "3+4=*2="                                 answer "4"      text "3+4=*2=4\\n"   (modulo 5)

expression: the same operations evaluated left to right with one "=" at the end:

    prompt  "3*4="                                    answer "2"      text "3*4=2\\n"      (modulo 10)

assignments: a chain of named variables, each an operation on the one before, with `num_distractors`
extra assignments (a digit, or an operation on a variable defined before them) inserted at random
places, and a query for the end of the chain. Variable names are drawn from a shuffled alphabet:

    prompt  "k=3,q=k+4,x=7,m=q-2;m?"                  answer "5"      text "k=3,q=k+4,x=7,m=q-2;m?5\\n"  (modulo 10)

Answering takes one sequential step per operation. The default, one or two additions or
multiplications modulo 5 in the chain form ("3*4=2", "3+4=*2=4"), is chosen so that the loops matter
on a CPU budget and on every seed. The second operation of a two-operation line applies to the first
one's result, which exists only once a pass has computed it at the first "="; a looped model's first
loop sees nothing but the tokens there, so it could answer such a line only through one table of every
digit-operation-digit-operation-digit combination (500 modulo 5), which the pipeline's one-layer model
does not learn in one pass, while its later loops learn the two steps, one table applied twice,
within a few CPU minutes. Measured per-loop accuracies: docs/measured.md, "Embedded default: spread
over seeds and thread counts".

`answer_batch` makes the rows on which `evaluation.teacher_forced_exact_match` scores a model's
answers without decoding: the answer is predicted exactly under greedy decoding iff every answer
token is the argmax of the logits at the position before it.
"""

from __future__ import annotations

import dataclasses
import itertools
import string
from collections.abc import Sequence

import datasets
import numpy as np

from melt_jax.data.packing import PackedData
from melt_jax.data.tokenizer import Tokenizer
from melt_jax.errors import DataError

# Each operation as a function of (x, y) before the modulus is taken.
OPERATIONS = {
    "+": lambda x, y: x + y,
    "-": lambda x, y: x - y,
    "*": lambda x, y: x * y,
}
VARIABLE_NAMES = string.ascii_lowercase
FORMS = ("expression", "chain", "assignments")


@dataclasses.dataclass(frozen=True)
class SyntheticTaskConfig:
    """Settings of the task.

    form             "chain": a digit and operations each ending with "=", "3+4=*2=" (each applied to
                     the value so far); "expression": a digit and operations, "3+4-2=" (evaluated left
                     to right);
                     "assignments": named variables, "k=3,q=k+4,m=q-2;m?" (with distractors)
    num_examples     number of examples
    min_hops         fewest operations in the queried chain (0: the query names a digit assignment)
    max_hops         most operations in the queried chain (inclusive)
    num_distractors  assignments per example that the answer does not depend on
    ops              operations to draw from, a subset of ("+", "-", "*")
    modulus          digits are drawn from 0..modulus-1 and every operation is taken modulo it (2..10)
    seed             seed of the generator (use different seeds for train and eval)
    """

    form: str = "chain"
    num_examples: int = 10_000
    min_hops: int = 1
    max_hops: int = 2
    num_distractors: int = 0
    ops: tuple[str, ...] = ("+", "*")
    modulus: int = 5
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "ops", tuple(self.ops))
        if self.form not in FORMS:
            raise DataError(f"SyntheticTaskConfig.form must be one of {list(FORMS)}, got {self.form!r}")
        for name, minimum in (
            ("num_examples", 1),
            ("min_hops", 0),
            ("max_hops", 0),
            ("num_distractors", 0),
            ("modulus", 2),
            ("seed", 0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise DataError(f"SyntheticTaskConfig.{name} must be an integer >= {minimum}, got {value!r}")
        if self.modulus > 10:
            raise DataError(f"SyntheticTaskConfig.modulus must be at most 10 (one-digit values), got {self.modulus}")
        if self.max_hops < self.min_hops:
            raise DataError(f"SyntheticTaskConfig.max_hops {self.max_hops} is below min_hops {self.min_hops}")
        if self.form != "assignments" and self.num_distractors:
            raise DataError(
                f"SyntheticTaskConfig.num_distractors is {self.num_distractors}, but the {self.form} form has "
                "no distractors (set it to 0, or use form='assignments')"
            )
        if self.form == "chain" and self.min_hops < 1:
            raise DataError(
                "SyntheticTaskConfig.min_hops must be >= 1 in the chain form (each line ends with an "
                f"operation's '='), got {self.min_hops}"
            )
        num_variables = self.max_hops + 1 + self.num_distractors
        if num_variables > len(VARIABLE_NAMES):
            raise DataError(
                f"SyntheticTaskConfig needs max_hops + 1 + num_distractors = {num_variables} variables, "
                f"more than the {len(VARIABLE_NAMES)} letters"
            )
        unknown = [op for op in self.ops if op not in OPERATIONS]
        if not self.ops or unknown or len(set(self.ops)) != len(self.ops):
            raise DataError(
                f"SyntheticTaskConfig.ops must be distinct operations from {list(OPERATIONS)}, got {self.ops!r}"
            )


# --------------------------------------------------------------------------------------------------
# Generation


def _defined_variable(statement: str) -> str:
    return statement.split("=", 1)[0]


def _operations(
    rng: np.random.Generator, ops: Sequence[str], hops: int, modulus: int
) -> tuple[int, list[tuple[str, int]], int]:
    """A start digit, `hops` (operation, operand digit) pairs drawn from `ops`, and the value of
    applying them to the start in order, modulo `modulus` (digits are below it)."""
    start = value = int(rng.integers(modulus))
    steps = []
    for _ in range(hops):
        op = ops[int(rng.integers(len(ops)))]
        operand = int(rng.integers(modulus))
        value = OPERATIONS[op](value, operand) % modulus
        steps.append((op, operand))
    return start, steps, value


def generate_example(rng: np.random.Generator, config: SyntheticTaskConfig) -> tuple[str, str, int]:
    """One example drawn with `rng`: (prompt, answer, hops)."""
    hops = int(rng.integers(config.min_hops, config.max_hops + 1))
    if config.form in ("expression", "chain"):
        start, steps, value = _operations(rng, config.ops, hops, config.modulus)
        if config.form == "chain":  # an "=" after each operation, where its (unwritten) value is computed
            return str(start) + "".join(f"{op}{operand}=" for op, operand in steps), str(value), hops
        return str(start) + "".join(f"{op}{operand}" for op, operand in steps) + "=", str(value), hops

    letters = rng.permutation(len(VARIABLE_NAMES))[: hops + 1 + config.num_distractors]
    names = [VARIABLE_NAMES[i] for i in letters]
    chain, distractors = names[: hops + 1], names[hops + 1 :]
    start, steps, value = _operations(rng, config.ops, hops, config.modulus)
    statements = [f"{chain[0]}={start}"]
    for (previous, name), (op, operand) in zip(itertools.pairwise(chain), steps):
        statements.append(f"{name}={previous}{op}{operand}")

    for name in distractors:
        position = int(rng.integers(len(statements) + 1))
        defined = [_defined_variable(s) for s in statements[:position]]
        if defined and rng.random() < 0.5:  # an operation on a variable defined before it
            source = defined[int(rng.integers(len(defined)))]
            op = config.ops[int(rng.integers(len(config.ops)))]
            statements.insert(position, f"{name}={source}{op}{int(rng.integers(config.modulus))}")
        else:
            statements.insert(position, f"{name}={int(rng.integers(config.modulus))}")

    prompt = ",".join(statements) + f";{chain[-1]}?"
    return prompt, str(value), hops


def synthetic_reasoning_dataset(config: SyntheticTaskConfig = SyntheticTaskConfig()) -> datasets.Dataset:
    """`config.num_examples` examples with columns `prompt` (ends right before the answer), `answer`,
    `text` (prompt + answer + newline) and `hops`; the same for the same config."""
    rng = np.random.default_rng(config.seed)
    prompts, answers, hops = [], [], []
    for _ in range(config.num_examples):
        prompt, answer, n = generate_example(rng, config)
        prompts.append(prompt)
        answers.append(answer)
        hops.append(n)
    texts = [p + a + "\n" for p, a in zip(prompts, answers)]
    return datasets.Dataset.from_dict({"prompt": prompts, "answer": answers, "text": texts, "hops": hops})


# --------------------------------------------------------------------------------------------------
# Scoring


def exact_match_accuracy(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of predictions equal to their answer after stripping surrounding whitespace."""
    if len(predictions) != len(answers):
        raise DataError(f"exact_match_accuracy got {len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        raise DataError("exact_match_accuracy got no answers")
    hits = sum(p.strip() == a.strip() for p, a in zip(predictions, answers))
    return hits / len(answers)


def answer_batch(
    tokenizer: Tokenizer, prompts: Sequence[str], answers: Sequence[str], seq_len: int
) -> dict[str, np.ndarray]:
    """Prompt + answer token rows for teacher-forced scoring.

    tokens          int32 [B, S]    ids of prompt then answer (tokenized separately), right-padded
                                    with the tokenizer's pad id
    answer_mask     float32 [B, S]  1 exactly at the answer tokens
    prompt_lengths  int32 [B]       number of prompt tokens (the first answer position)
    """
    if len(prompts) != len(answers):
        raise DataError(f"answer_batch got {len(prompts)} prompts for {len(answers)} answers")
    if not prompts:
        raise DataError("answer_batch got no examples")
    tokens = np.full((len(prompts), seq_len), tokenizer.pad_id, np.int32)  # [B, S]
    answer_mask = np.zeros((len(prompts), seq_len), np.float32)  # [B, S]
    prompt_lengths = np.zeros(len(prompts), np.int32)  # [B]
    for b, (prompt, answer) in enumerate(zip(prompts, answers)):
        prompt_ids, answer_ids = tokenizer.encode(prompt), tokenizer.encode(answer)
        if not prompt_ids:
            raise DataError(f"example {b} has an empty prompt; the first answer token needs a token before it")
        if not answer_ids:
            raise DataError(f"example {b} has an empty answer {answer!r}")
        length = len(prompt_ids) + len(answer_ids)
        if length > seq_len:
            raise DataError(f"example {b} has {length} prompt + answer tokens, more than seq_len {seq_len}: {prompt!r}")
        tokens[b, :length] = prompt_ids + answer_ids
        answer_mask[b, len(prompt_ids) : length] = 1.0
        prompt_lengths[b] = len(prompt_ids)
    return {"tokens": tokens, "answer_mask": answer_mask, "prompt_lengths": prompt_lengths}


def pack_answer_examples(
    tokenizer: Tokenizer, prompts: Sequence[str], answers: Sequence[str], seq_len: int
) -> PackedData:
    """Training rows with the loss on the answers only: whole examples (prompt, answer, newline, eos)
    packed back to back into rows of `seq_len` tokens, none split across rows; loss_mask is 1 at the
    answer tokens and the newline after them, segment_ids number the examples of a row from 1."""
    rows: list[tuple[list[int], list[float], list[int]]] = []
    tokens: list[int] = []
    mask: list[float] = []
    segments: list[int] = []
    for b, (prompt, answer) in enumerate(zip(prompts, answers)):
        prompt_ids, answer_ids = tokenizer.encode(prompt), tokenizer.encode(answer + "\n")
        example = prompt_ids + answer_ids + [tokenizer.eos_id]
        if not prompt_ids:
            raise DataError(f"example {b} has an empty prompt; the first answer token needs a token before it")
        if len(example) > seq_len:
            raise DataError(f"example {b} has {len(example)} tokens, more than seq_len {seq_len}: {prompt!r}")
        if len(tokens) + len(example) > seq_len:
            rows.append((tokens, mask, segments))
            tokens, mask, segments = [], [], []
        segment = (segments[-1] if segments else 0) + 1
        tokens += example
        mask += [0.0] * len(prompt_ids) + [1.0] * len(answer_ids) + [0.0]
        segments += [segment] * len(example)
    if tokens:
        rows.append((tokens, mask, segments))

    def padded(values: list[list], fill, dtype) -> np.ndarray:
        return np.array([row + [fill] * (seq_len - len(row)) for row in values], dtype)  # [N, S]

    return PackedData(
        tokens=padded([r[0] for r in rows], tokenizer.pad_id, np.int32),
        loss_mask=padded([r[1] for r in rows], 0.0, np.float32),
        segment_ids=padded([r[2] for r in rows], 0, np.int32),
    )

"""Synthetic multi-step arithmetic word problems: the demo recipe's reasoning task.

A problem gives a person a number of items and then applies a few operations to them (1-3
in the presets: buy, give away, double, ...); the worked solution writes one equation per operation and puts the
final answer after `####` (the GSM8K convention):

  prompt:   "Mia has 7 apples. She buys 5 more. She gives 3 to Sam. How many apples does Mia
             have now?\\n"
  response: "7 + 5 = 12. 12 - 3 = 9. #### 9"

The prompt ends with a newline, so `prompt + response` is exactly the pretraining document
(`pretrain.txt`) and the SFT tokens `encode(prompt) + encode(response)` are the tokens the
pretrained model saw (sentencepiece splits digits, so nothing merges across the newline).

Everything is deterministic from `seed`. Each split draws from its own RNG, seeded by
(seed, split), and keeps only prompts whose hash (independent of the seed) falls in that
split's bucket (80% train, 10% validation, 10% test of the hash space), so no prompt can
appear in two splits, for any seeds; prompts are also unique within a split. A split is a
stream: `make_split(s, n)` is a prefix of `make_split(s, m)` for n < m.

Difficulty knobs (see `Difficulty` and the `LEVELS` presets): number of operations, allowed
operations (`+`, `-`, `*` by a small factor), the largest number given in the problem and
the largest value any number may take (start, operand, intermediate result or answer). All
values are positive integers (a subtraction never takes everything away, so no answer is 0).

The verifier: `extract_answer` reads the integer after the last `####`, `verify` compares it
with the example's answer, and `verify_steps` checks separately that the completion is a
well-formed chain of true equations ending in its `####` answer.

`write_task` (command line: `python -m llada_jax.task`) writes DIR/{train,validation,test}.jsonl
(`{"prompt", "response", "answer", "n_ops", "op_seq"}` per line) and DIR/pretrain.txt (the first
`pretrain` training problems, default `train`, as running text separated by blank lines), byte for
byte the same for the same arguments.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
from typing import Any, Iterable

from llada_jax.data import readers

SPLITS = ("train", "validation", "test")
# Share of the prompt-hash space (out of 100) that belongs to each split.
_SPLIT_BUCKETS = {"train": range(0, 80), "validation": range(80, 90), "test": range(90, 100)}

OPS = "+-*"
ANSWER_MARK = "####"


# ---------------------------------------------------------------------------- difficulty.

@dataclasses.dataclass(frozen=True)
class Difficulty:
  """Knobs of the problem distribution.

  min_ops, max_ops: number of operations per problem, drawn uniformly from this range.
  ops: the allowed operations, a subset of "+-*"; each step picks uniformly among the allowed
    operations that keep the value within [1, max_value].
  max_operand: the largest start amount and the largest number added or subtracted.
  max_value: the largest value any number (start, operand, intermediate, answer) may take.
  max_factor: multiplication is by a factor in 2..max_factor.
  """
  min_ops: int = 1
  max_ops: int = 3
  ops: str = "+-*"
  max_operand: int = 20
  max_value: int = 50
  max_factor: int = 2

  def __post_init__(self):
    if not 1 <= self.min_ops <= self.max_ops:
      raise ValueError(f"need 1 <= min_ops <= max_ops, got min_ops={self.min_ops}, "
                       f"max_ops={self.max_ops}")
    if self.max_ops > 6:
      raise ValueError(f"max_ops={self.max_ops} makes prompts too long; expected at most 6")
    if not self.ops or any(op not in OPS for op in self.ops) or len(set(self.ops)) != len(
        self.ops):
      raise ValueError(f"ops must be distinct characters of {OPS!r}, got {self.ops!r}")
    if self.ops == "-" and self.max_operand <= self.min_ops:
      raise ValueError(f"with ops='-' a start of at most max_operand={self.max_operand} "
                       f"cannot stay positive through {self.min_ops} subtractions")
    if self.max_operand < 1:
      raise ValueError(f"max_operand must be >= 1, got {self.max_operand}")
    if self.max_value < max(2, self.max_operand):
      raise ValueError(f"max_value must be >= max(2, max_operand={self.max_operand}), got "
                       f"{self.max_value}")
    if self.max_factor < 2:
      raise ValueError(f"max_factor must be >= 2, got {self.max_factor}")


LEVELS: dict[str, Difficulty] = {
    # Short sums and differences of one-digit numbers.
    "easy": Difficulty(min_ops=1, max_ops=2, ops="+-", max_operand=9, max_value=20),
    # Up to three steps, two-digit numbers up to 50, doubling.
    "medium": Difficulty(min_ops=1, max_ops=3, ops="+-*", max_operand=20, max_value=50,
                         max_factor=2),
    # Two or three steps, numbers up to 99, doubling and tripling.
    "hard": Difficulty(min_ops=2, max_ops=3, ops="+-*", max_operand=30, max_value=99,
                       max_factor=3),
}
DEFAULT_LEVEL = "medium"


def make_difficulty(level: str | Difficulty | None = None, **overrides) -> Difficulty:
  """A `Difficulty`: the preset `level` (default "medium") with `overrides` replaced.

  Overrides that are None are ignored, so CLI flags can be passed straight through.
  """
  if isinstance(level, Difficulty):
    base = level
  else:
    level = DEFAULT_LEVEL if level is None else level
    if level not in LEVELS:
      raise ValueError(f"unknown level {level!r}; expected one of {', '.join(LEVELS)}")
    base = LEVELS[level]
  fields = {f.name for f in dataclasses.fields(Difficulty)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise TypeError(f"unknown difficulty knob(s) {', '.join(unknown)}; expected 'level' or "
                    f"one of {', '.join(sorted(fields))}")
  return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


# ----------------------------------------------------------------------------- templates.

# (name, subject pronoun, possessive)
_PEOPLE = (
    ("Mia", "she", "her"), ("Sam", "he", "his"), ("Ava", "she", "her"), ("Leo", "he", "his"),
    ("Zoe", "she", "her"), ("Max", "he", "his"), ("Lily", "she", "her"), ("Ben", "he", "his"),
    ("Emma", "she", "her"), ("Tom", "he", "his"), ("Nora", "she", "her"), ("Jack", "he", "his"),
)
_ITEMS = ("apples", "pencils", "marbles", "stickers", "cookies", "books", "coins", "shells",
          "cards", "eggs")
# Clauses in the present tense; {s}/{p}: the person's subject pronoun (their name after a
# clause with another subject, so pronouns are never ambiguous) and possessive, {name}: the
# person, {x}: another person, {i}: the item, {n}: the operand.
_ADD = ("{s} buys {n} more", "{s} finds {n} more", "{x} gives {name} {n} more")
_SUB = ("{s} gives {n} to {x}", "{s} sells {n}", "{s} loses {n}", "{x} takes {n} from {name}")
_MUL = {2: "{s} doubles {p} {i}", 3: "{s} triples {p} {i}"}
_MUL_ANY = "{s} multiplies {p} {i} by {n}"
_QUESTIONS = ("How many {i} does {name} have now?", "How many {i} does {name} have?")


def _apply(op: str, a: int, b: int) -> int:
  return a + b if op == "+" else a - b if op == "-" else a * b


def _draw_steps(rng: random.Random, d: Difficulty, n_ops: int) -> tuple[int, list]:
  """(start, [(op, operand, result), ...]) with every value in [1, max_value]."""
  for _ in range(1000):
    start = rng.randint(1, min(d.max_operand, d.max_value))
    value, steps = start, []
    for _ in range(n_ops):
      feasible = [op for op in d.ops
                  if (op == "+" and value + 1 <= d.max_value)
                  or (op == "-" and value >= 2)
                  or (op == "*" and value >= 1 and 2 * value <= d.max_value)]
      if not feasible:
        break
      op = rng.choice(feasible)
      if op == "+":
        b = rng.randint(1, min(d.max_operand, d.max_value - value))
      elif op == "-":
        b = rng.randint(1, min(d.max_operand, value - 1))
      else:
        b = rng.randint(2, min(d.max_factor, d.max_value // value))
      value = _apply(op, value, b)
      steps.append((op, b, value))
    if len(steps) == n_ops:
      return start, steps
  raise ValueError(f"cannot draw {n_ops} operations within {d}; widen the difficulty")


def _generate(rng: random.Random, d: Difficulty) -> dict[str, Any]:
  n_ops = rng.randint(d.min_ops, d.max_ops)
  start, steps = _draw_steps(rng, d, n_ops)
  name, s, p = rng.choice(_PEOPLE)
  item = rng.choice(_ITEMS)
  others = [person[0] for person in _PEOPLE if person[0] != name]
  sentences = [f"{name} has {start} {item}."]
  equations, value, subject = [], start, s
  for op, b, result in steps:
    if op == "+":
      template = rng.choice(_ADD)
    elif op == "-":
      template = rng.choice(_SUB)
    else:
      template = _MUL.get(b, _MUL_ANY)
    clause = template.format(s=subject, p=p, name=name, x=rng.choice(others), i=item, n=b)
    sentences.append(f"{clause[0].upper()}{clause[1:]}.")
    subject = s if template.startswith("{s}") else name
    equations.append(f"{value} {op} {b} = {result}.")
    value = result
  sentences.append(rng.choice(_QUESTIONS).format(i=item, name=name))
  return {
      "prompt": " ".join(sentences) + "\n",
      "response": " ".join(equations) + f" {ANSWER_MARK} {value}",
      "answer": value,
      "n_ops": n_ops,
      "op_seq": "".join(op for op, _, _ in steps),
  }


# make_split gives up after this many draws in a row yield no new prompt of the split: the
# distribution is (nearly) exhausted. A split owns >= 10% of the prompts, so while unseen
# prompts are common this never happens by chance.
_MAX_MISSES = 20_000


def split_of(prompt: str) -> str:
  """The split that owns `prompt`: a seed-independent hash of its text."""
  bucket = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big") % 100
  return next(split for split, r in _SPLIT_BUCKETS.items() if bucket in r)


def make_split(split: str, n: int, *, seed: int = 0, **difficulty) -> list[dict[str, Any]]:
  """`n` distinct problems of `split` ('train', 'validation' or 'test').

  `difficulty`: `level` ("easy", "medium" (default), "hard" or a `Difficulty`) and/or any
  `Difficulty` field, overriding the level's value. Each example is a dict with `prompt` (the
  problem, ending in a newline), `response` (the worked solution), `answer` (int), `n_ops` and
  `op_seq` (the operations in order, e.g. "+-").
  """
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}")
  d = make_difficulty(**difficulty)
  rng = random.Random(f"llada_jax.demo_task:{seed}:{split}")
  examples, seen, misses = [], set(), 0
  while len(examples) < n:
    ex = _generate(rng, d)
    if ex["prompt"] in seen or split_of(ex["prompt"]) != split:
      misses += 1
      if misses == _MAX_MISSES:
        raise ValueError(f"found only {len(examples)} of {n} distinct {split} problems with "
                         f"{d}: {_MAX_MISSES} draws in a row were duplicates or belonged to "
                         f"other splits; widen the difficulty or ask for fewer")
      continue
    misses = 0
    seen.add(ex["prompt"])
    examples.append(ex)
  return examples


# ------------------------------------------------------------------------------ verifier.

_ANSWER_RE = re.compile(r"\s*([+-]?\d+)\s*\.?\s*")
_EQUATION_RE = re.compile(r"\s*([+-]?\d+)\s*([-+*x×])\s*([+-]?\d+)\s*=\s*([+-]?\d+)\s*")


def extract_answer(text: str) -> int | None:
  """The integer after the last `####`, or None.

  Whitespace around the number and one trailing period are tolerated; anything else after
  it (words, a second number, a decimal point) makes the answer malformed.
  """
  if not isinstance(text, str) or ANSWER_MARK not in text:
    return None
  m = _ANSWER_RE.fullmatch(text.rsplit(ANSWER_MARK, 1)[1])
  return int(m.group(1)) if m else None


def verify(example: dict[str, Any], completion_text: str) -> bool:
  """Whether the completion's final `####` answer equals `example['answer']`."""
  answer = extract_answer(completion_text)
  return answer is not None and answer == int(example["answer"])


def parse_steps(text: str) -> list[tuple[int, str, int, int]] | None:
  """The equations `a op b = c.` before the last `####`, or None if that part is malformed.

  Every period-terminated sentence before `####` must be one equation; `op` is `+`, `-` or
  `*` (`x` and `×` are read as `*`).
  """
  if not isinstance(text, str) or ANSWER_MARK not in text:
    return None
  body = text.rsplit(ANSWER_MARK, 1)[0].strip()
  if not body.endswith("."):
    return None
  steps = []
  for sentence in body[:-1].split("."):
    m = _EQUATION_RE.fullmatch(sentence)
    if m is None:
      return None
    a, op, b, c = m.groups()
    steps.append((int(a), "*" if op in "x×" else op, int(b), int(c)))
  return steps


def verify_steps(completion_text: str) -> bool:
  """Whether the completion is a well-formed chain of true equations ending in its answer.

  Checks, independently of the problem: at least one equation, each `a op b = c` true, each
  equation after the first starts from the previous result, and the `####` answer is the last
  result. A completion can pass `verify` and fail this (right answer, wrong working) or the
  reverse (correct arithmetic on the wrong numbers).
  """
  steps = parse_steps(completion_text)
  if not steps:
    return False
  answer = extract_answer(completion_text)
  previous = None
  for a, op, b, c in steps:
    if _apply(op, a, b) != c or (previous is not None and a != previous):
      return False
    previous = c
  return answer == previous


def score(example: dict[str, Any], completion_text: str) -> dict[str, Any]:
  """{'answer': extracted int or None, 'correct': verify(...), 'steps_valid': verify_steps(...)}."""
  return {"answer": extract_answer(completion_text),
          "correct": verify(example, completion_text),
          "steps_valid": verify_steps(completion_text)}


# ----------------------------------------------------------------------------------- I/O.

def format_document(example: dict[str, Any]) -> str:
  """The pretraining text of an example: its problem and worked solution on two lines."""
  return example["prompt"] + example["response"]


def write_jsonl(path: str | os.PathLike, examples: Iterable[dict[str, Any]]) -> None:
  """One JSON object per line, keys in the examples' order, '\\n' line endings."""
  with open(path, "w", encoding="utf-8", newline="\n") as f:
    for ex in examples:
      f.write(json.dumps(ex, ensure_ascii=False) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  readers.check_exists(path, "task file")  # a pipe or directory fails here, not inside open()
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def write_pretrain_text(path: str | os.PathLike, examples: Iterable[dict[str, Any]]) -> None:
  """Documents (`format_document`) separated by blank lines."""
  with open(path, "w", encoding="utf-8", newline="\n") as f:
    f.write("\n\n".join(format_document(ex) for ex in examples) + "\n")


def write_task(out_dir: str | os.PathLike, *, train: int, validation: int, test: int,
               pretrain: int | None = None, seed: int = 0, **difficulty) -> dict[str, str]:
  """Writes train/validation/test.jsonl and pretrain.txt under out_dir; returns their paths.

  pretrain.txt holds the first `pretrain` (default `train`) training problems, so it never
  contains a validation or test prompt.
  """
  pretrain = train if pretrain is None else pretrain
  os.makedirs(out_dir, exist_ok=True)
  paths = {}
  train_examples = make_split("train", max(train, pretrain), seed=seed, **difficulty)
  for split, n in (("train", train), ("validation", validation), ("test", test)):
    examples = (train_examples[:n] if split == "train"
                else make_split(split, n, seed=seed, **difficulty))
    paths[split] = os.path.join(out_dir, f"{split}.jsonl")
    write_jsonl(paths[split], examples)
  paths["pretrain"] = os.path.join(out_dir, "pretrain.txt")
  write_pretrain_text(paths["pretrain"], train_examples[:pretrain])
  return paths


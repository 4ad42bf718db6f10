"""Record schemas of SFT and preference data: TRL's dataset formats, detected and checked.

SFT (one example per answer):
- `{"prompt": str, "response": str}` or `{"prompt": str, "completion": str}`;
- `{"prompt": [messages], "completion": [one assistant message]}`;
- `{"messages": [messages]}`: one example per assistant turn, prompted by everything before it.

Preference (one pair per record):
- `{"prompt": str, "chosen": str, "rejected": str}`;
- `{"chosen": str, "rejected": str}` (implicit prompt): the prompt is the words both start with;
  the split falls before the whitespace ahead of the first differing word, so no word is cut in
  two and each answer starts with its separating whitespace (TRL cuts at the first differing
  character, which can leave half a word in the prompt);
- `{"prompt": [messages], "chosen": [one assistant message], "rejected": [...]}`;
- `{"chosen": [messages], "rejected": [messages]}` (implicit prompt): the prompt is the longest
  run of identical leading messages; each must then end with exactly one assistant message.

A message is `{"role": "system"|"user"|"assistant", "content": str}`. A conversational prompt
may hold several turns (earlier answers included) and must end with a user message. An answer
is exactly one assistant message: it is encoded as plain text after the prompt's open
assistant header, which has no place for a second header.

The functions here are pure: they return validated prompts and answers, or raise DataError at
the record (`line`; a `Record` there names a record index) and field, e.g. `chosen[1].role`.
"""

from __future__ import annotations

import dataclasses
import os

from llada_jax.data.errors import DataError
from llada_jax.data.readers import get_string
from llada_jax.data.tokenizer import CHAT_ROLES

_MESSAGE = "{\"role\", \"content\"} objects"


@dataclasses.dataclass(frozen=True)
class Example:
  """One example's prompt (messages or plain text) and its answers, not yet tokenized."""
  messages: list[dict[str, str]] | None  # conversational prompt
  prompt: str | None  # plain prompt
  answers: dict[str, tuple[str, str]]  # name -> (field for errors, text)
  prompt_field: str  # where the prompt came from, for errors


def messages(value, field: str, *, path, line) -> list[dict[str, str]]:
  """`value` checked to be a non-empty list of messages; fields read like `chosen[1].role`."""
  if not isinstance(value, list) or not value:
    got = "an empty list" if value == [] else type(value).__name__
    raise DataError(f"expected a non-empty list of {_MESSAGE}, got {got}", path=path, line=line, field=field)
  clean = []
  for i, m in enumerate(value):
    if not isinstance(m, dict):
      raise DataError(f"expected an object with 'role' and 'content', got {type(m).__name__}",
                      path=path, line=line, field=f"{field}[{i}]")
    role = m.get("role")
    if role not in CHAT_ROLES:
      raise DataError(f"role {role!r}; expected one of {', '.join(CHAT_ROLES)}",
                      path=path, line=line, field=f"{field}[{i}].role")
    content = get_string(m, "content", path=path, line=line, field=f"{field}[{i}].content")
    clean.append({"role": role, "content": content})
  return clean


def _check_prompt(prompt: list[dict[str, str]], field: str, *, path, line) -> None:
  last = len(prompt) - 1
  if prompt[last]["role"] != "user":
    raise DataError(f"the prompt's last message has role {prompt[last]['role']!r}; expected a user "
                    "message last, which the answer replies to", path=path, line=line,
                    field=f"{field}[{last}].role")


def _answer(conversation: list[dict[str, str]], start: int, field: str, *, path, line) -> tuple[str, str]:
  """(field, text) of the single assistant message `conversation[start:]` must be."""
  rest = len(conversation) - start
  if rest != 1:
    where = f" after the {start} prompt messages it shares" if start else ""
    raise DataError(f"holds {rest} messages{where}; expected exactly one assistant message as the answer",
                    path=path, line=line, field=field)
  if conversation[start]["role"] != "assistant":
    raise DataError(f"role {conversation[start]['role']!r}; expected 'assistant' for the answer",
                    path=path, line=line, field=f"{field}[{start}].role")
  return f"{field}[{start}].content", conversation[start]["content"]


def _dialogue(obj: dict, *, path, line) -> list[Example]:
  """One example per assistant turn of `messages`, prompted by everything before it."""
  clean = messages(obj["messages"], "messages", path=path, line=line)
  examples = []
  for i, m in enumerate(clean):
    if m["role"] != "assistant":
      continue
    if not any(p["role"] == "user" for p in clean[:i]):
      raise DataError("assistant turn with no user turn before it; expected a user message first",
                      path=path, line=line, field=f"messages[{i}]")
    examples.append(Example(clean[:i], None, {"response": (f"messages[{i}].content", m["content"])},
                            "messages"))
  if not examples:
    raise DataError("no assistant turn; expected at least one message with role 'assistant'",
                    path=path, line=line, field="messages")
  return examples


def sft_examples(obj: dict, *, path, line) -> list[Example]:
  """The SFT examples of one record (see the module docstring for the schemas)."""
  if "messages" in obj:
    return _dialogue(obj, path=path, line=line)
  if "response" in obj and "completion" in obj:
    raise DataError("both 'response' and 'completion' are given; expected one answer field",
                    path=path, line=line, field="completion")
  if isinstance(obj.get("prompt"), list):
    prompt = messages(obj["prompt"], "prompt", path=path, line=line)
    _check_prompt(prompt, "prompt", path=path, line=line)
    if "completion" not in obj:
      raise DataError("missing; expected a list holding one assistant message, as 'prompt' is a list of "
                      "messages", path=path, line=line, field="completion")
    completion = messages(obj["completion"], "completion", path=path, line=line)
    return [Example(prompt, None, {"response": _answer(completion, 0, "completion", path=path, line=line)},
                    "prompt")]
  if "prompt" not in obj and "response" not in obj and "completion" not in obj:
    raise DataError("missing; expected 'prompt' and 'response' (or 'completion') strings, or 'messages'",
                    path=path, line=line, field="prompt")
  prompt = get_string(obj, "prompt", path=path, line=line)
  key = "completion" if "completion" in obj else "response"
  return [Example(None, prompt, {"response": (key, get_string(obj, key, path=path, line=line))}, "prompt")]


def text_prompt_end(chosen: str, rejected: str) -> int:
  """Where the prompt shared by two plain-text answers ends (see the module docstring)."""
  end = len(os.path.commonprefix([chosen, rejected]))
  while end and not chosen[end - 1].isspace():  # back to the start of the differing word
    end -= 1
  while end and chosen[end - 1].isspace():  # its whitespace goes with the answers
    end -= 1
  return end


def _implicit_text(obj: dict, *, path, line) -> Example:
  chosen = get_string(obj, "chosen", path=path, line=line)
  rejected = get_string(obj, "rejected", path=path, line=line)
  end = text_prompt_end(chosen, rejected)
  if chosen != rejected and not chosen[:end].strip():
    raise DataError("no 'prompt', and chosen and rejected share no leading words to take as one; "
                    "expected an explicit 'prompt' or answers that both start with the prompt",
                    path=path, line=line, field="prompt")
  return Example(None, chosen[:end], {"chosen": ("chosen", chosen[end:]), "rejected": ("rejected", rejected[end:])},
                 "chosen")


def _implicit_conversation(obj: dict, *, path, line) -> Example:
  chosen = messages(obj.get("chosen"), "chosen", path=path, line=line)
  rejected = messages(obj.get("rejected"), "rejected", path=path, line=line)
  if chosen == rejected:
    _identical(path, line, "rejected")
  shared = 0
  while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
    shared += 1
  if not shared:
    raise DataError("no 'prompt', and chosen and rejected differ from their first message; expected both "
                    "to start with the same prompt messages, or an explicit 'prompt'",
                    path=path, line=line, field="rejected[0]")
  _check_prompt(chosen[:shared], "chosen", path=path, line=line)
  answers = {name: _answer(conv, shared, name, path=path, line=line)
             for name, conv in (("chosen", chosen), ("rejected", rejected))}
  return Example(chosen[:shared], None, answers, "chosen")


def _explicit(obj: dict, *, path, line) -> Example:
  if not isinstance(obj["prompt"], list):
    prompt = get_string(obj, "prompt", path=path, line=line)
    answers = {name: (name, get_string(obj, name, path=path, line=line)) for name in ("chosen", "rejected")}
    return Example(None, prompt, answers, "prompt")
  prompt = messages(obj["prompt"], "prompt", path=path, line=line)
  _check_prompt(prompt, "prompt", path=path, line=line)
  answers = {}
  for name in ("chosen", "rejected"):
    if name not in obj:
      raise DataError("missing; expected a list holding one assistant message, as 'prompt' is a list of "
                      "messages", path=path, line=line, field=name)
    answers[name] = _answer(messages(obj[name], name, path=path, line=line), 0, name, path=path, line=line)
  return Example(prompt, None, answers, "prompt")


def preference_example(obj: dict, *, path, line) -> Example:
  """The preference pair of one record (see the module docstring for the schemas)."""
  if "prompt" in obj:
    example = _explicit(obj, path=path, line=line)
  elif isinstance(obj.get("chosen"), list) or isinstance(obj.get("rejected"), list):
    example = _implicit_conversation(obj, path=path, line=line)
  elif isinstance(obj.get("chosen"), str) and isinstance(obj.get("rejected"), str):
    example = _implicit_text(obj, path=path, line=line)
  else:
    raise DataError("missing; expected a string or a list of messages (or 'chosen' and 'rejected' that both "
                    "hold the prompt too)", path=path, line=line, field="prompt")
  (_, chosen), (field, rejected) = example.answers["chosen"], example.answers["rejected"]
  if chosen == rejected:
    _identical(path, line, field)
  return example


def _identical(path, line, field):
  # Identical answers state no preference; such a pair only adds noise to the loss (often a copying slip).
  raise DataError("chosen and rejected are identical; expected two different answers",
                  path=path, line=line, field=field)

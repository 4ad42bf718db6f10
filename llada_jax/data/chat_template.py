"""Jinja chat templates from a Hugging Face `tokenizer_config.json`, cut into safe pieces.

Rendering a template to text and tokenizing that text with special tokens matched (what
`apply_chat_template` does) lets a message holding the text `<|eot_id|>` end its own turn. Here
the template is rendered with each message content replaced by a placeholder, special tokens are
matched only in the text the template itself wrote, and the contents come back as plain text,
to be encoded with special-token matching off. A second rendering with the real contents must
give the same text, so the result is the exact text the template makes, with its structure
taken from the template alone.
"""

from __future__ import annotations

import json
import os
import re
from typing import Mapping, Sequence

from llada_jax.data.errors import DataError

CONFIG_FILE = "tokenizer_config.json"

# Private-use characters: they delimit placeholders in a rendering that holds no user text.
_OPEN, _CLOSE = "\ue000", "\ue001"
_PLACEHOLDER = re.compile(f"{_OPEN}(\\d+)([slr]*){_CLOSE}")
_STRIPS = {"s": "strip", "l": "lstrip", "r": "rstrip"}


class _Slot(str):
  """A content placeholder that remembers whitespace trimming (`| trim`, `.strip()`).

  Templates such as Llama-3's trim every content; the trim is replayed on the real content
  instead of being lost on the placeholder.
  """

  def _trimmed(self, op: str, chars):
    if chars is not None:  # trimming other characters is not replayed: the check then fails
      return getattr(str(self), _STRIPS[op])(chars)
    return _Slot(self[:-1] + op + _CLOSE)

  def strip(self, chars=None):
    return self._trimmed("s", chars)

  def lstrip(self, chars=None):
    return self._trimmed("l", chars)

  def rstrip(self, chars=None):
    return self._trimmed("r", chars)


def _raise_exception(message):
  from jinja2.exceptions import TemplateError  # noqa: PLC0415

  raise TemplateError(message)


def _special_variables(config: Mapping) -> dict[str, str]:
  """`bos_token`, `eos_token`, ... as the template sees them (strings, or {"content": ...})."""
  out = {}
  for key, value in config.items():
    if key.endswith("_token"):
      if isinstance(value, dict):
        value = value.get("content")
      if isinstance(value, str):
        out[key] = value
  return out


def _select(template, path: str) -> str | None:
  """The template text: a string, or the entry named "default" of a list of {name, template}."""
  if template is None:
    return None
  if isinstance(template, list):
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    if "default" not in named:
      raise DataError(f"chat_template lists templates {sorted(map(str, named))} but none named "
                      "'default'; expected a string or a list holding a 'default' template", path=path)
    template = named["default"]
  if not isinstance(template, str) or not template.strip():
    raise DataError(f"chat_template is {type(template).__name__}; expected a non-empty Jinja string",
                    path=path)
  return template


def _one_line(e: Exception) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  line = getattr(e, "lineno", None)
  return f"{text} (template line {line})" if line else text


class ChatTemplate:
  """A compiled chat template and the special tokens its own text may produce."""

  def __init__(self, source: str, path: str, variables: Mapping[str, str],
               specials: Mapping[str, int]):
    self.source, self.path = source, path
    self.variables = dict(variables)
    self.specials = dict(specials)
    longest_first = sorted(self.specials, key=len, reverse=True)
    self._split = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")") if longest_first else None
    self._template = self._compile()

  def _compile(self):
    import jinja2  # noqa: PLC0415 - only tokenizers that ship a template need it
    from jinja2 import ext, sandbox  # noqa: PLC0415

    # The settings transformers renders with, so whitespace comes out the same.
    env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[ext.loopcontrols])
    env.globals["raise_exception"] = _raise_exception
    try:
      return env.from_string(self.source)
    except jinja2.TemplateError as e:
      raise DataError(f"chat_template is not a valid Jinja template: {_one_line(e)}",
                      path=self.path) from None

  def __getstate__(self):
    # Compiled templates do not pickle; the source is recompiled on arrival.
    return {k: v for k, v in self.__dict__.items() if k != "_template"}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._template = self._compile()

  def _render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> str:
    try:
      return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   **self.variables)
    except Exception as e:  # noqa: BLE001 - a template can raise anything; report it in one line
      raise DataError(f"chat_template failed on this conversation: {_one_line(e)}", path=self.path) from None

  def pieces(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool
             ) -> list[int | str]:
    """The conversation as special ids (from the template's own text) and runs of plain text.

    Adjacent plain text, template text and contents alike, forms one run, as in the text a
    tokenizer would read, so the runs encode to the same ids as that text.
    """
    contents = [m["content"] for m in messages]
    slots = [{"role": m["role"], "content": _Slot(f"{_OPEN}{i}{_CLOSE}")} for i, m in enumerate(messages)]
    out: list[int | str] = []
    text = ""
    for k, part in enumerate(_PLACEHOLDER.split(self._render(slots, add_generation_prompt))):
      if k % 3 == 0:  # template text
        for j, chunk in enumerate(self._split.split(part) if self._split else [part]):
          if j % 2:
            out += [text, self.specials[chunk]] if text else [self.specials[chunk]]
            text = ""
          else:
            text += chunk
      elif k % 3 == 1:  # a placeholder: its index, then (next part) its trims
        content = contents[int(part)]
      else:
        for op in part:
          content = getattr(content, _STRIPS[op])()
        text += content
    if text:
      out.append(text)
    self._check(out, messages, add_generation_prompt)
    return out

  def _check(self, pieces, messages, add_generation_prompt) -> None:
    """Refuses a template that treats contents in ways the placeholders cannot follow."""
    inverse = {i: s for s, i in self.specials.items()}
    rebuilt = "".join(inverse[p] if isinstance(p, int) else p for p in pieces)
    if rebuilt != self._render([dict(m) for m in messages], add_generation_prompt):
      raise DataError("chat_template changes or inspects message contents in a way that cannot be "
                      "tokenized safely (only trimming whitespace is followed); expected a template "
                      "that writes each content as it is or trimmed", path=self.path)


def load(config_path: str, specials: Mapping[str, int]) -> ChatTemplate | None:
  """The chat template of `config_path` (tokenizer_config.json); None if it has none."""
  if not os.path.exists(config_path):
    return None
  try:
    with open(config_path, encoding="utf-8") as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f"cannot be read as JSON ({' '.join(str(e).split())}); expected a Hugging Face "
                    f"{CONFIG_FILE}", path=config_path) from None
  if not isinstance(config, dict):
    raise DataError(f"expected a JSON object, got {type(config).__name__}", path=config_path)
  source = _select(config.get("chat_template"), config_path)
  if source is None:
    return None
  return ChatTemplate(source, config_path, _special_variables(config), specials)

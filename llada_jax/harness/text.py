"""Text-side helpers of the harness model: chat markup, stop sequences and long-text windows.

lm-eval asks a model for its chat template as a string (`apply_chat_template`) and later hands
that string back as a request's context. The project's tokenizers never turn text into special
ids (user text cannot forge a chat marker), so the rendered string is read back by `markup_ids`:
a context that begins with the BOS marker text is chat markup, its marker texts become their
special ids and the text between them is encoded piece by piece, which gives exactly the ids of
`Tokenizer.encode_chat`. Reading the string rather than remembering it keeps lm-eval's request
cache (`--cache_requests`) working. The price: a marker text inside a chat message's content is read
as that special token too (plain contexts keep marker texts as text).
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

from llada_jax.data import tokenizer as tok_lib
from llada_jax.data.tokenizer import Tokenizer

# The same template as Jinja, for lm-eval's logs (`LM.chat_template`).
CHAT_TEMPLATE_JINJA = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}{% if not (loop.last and not add_generation_prompt and m['role'] == 'assistant') %}"
    "<|eot_id|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")

_MARKERS = (tok_lib.BOS_TOKEN, tok_lib.START_HEADER_TOKEN, tok_lib.END_HEADER_TOKEN, tok_lib.EOT_TOKEN)
_MARKER_RE = re.compile("(" + "|".join(re.escape(m) for m in _MARKERS) + ")")


def render_chat(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
  """The LLaDA chat template of `messages` as text, special tokens written out.

  With `add_generation_prompt` an open assistant header follows. Without it the last message is
  left open when it is the assistant's (lm-eval's `gen_prefix`: the answer continues it, as
  Hugging Face's `continue_final_message`).
  """
  parts = [tok_lib.BOS_TOKEN]
  for i, message in enumerate(messages):
    parts += [tok_lib.START_HEADER_TOKEN, message["role"], tok_lib.END_HEADER_TOKEN, "\n\n" + message["content"]]
    open_last = i == len(messages) - 1 and not add_generation_prompt and message["role"] == "assistant"
    if not open_last:
      parts.append(tok_lib.EOT_TOKEN)
  if add_generation_prompt:
    parts += [tok_lib.START_HEADER_TOKEN, "assistant", tok_lib.END_HEADER_TOKEN, "\n\n"]
  return "".join(parts)


def is_markup(text: str) -> bool:
  return text.startswith(tok_lib.BOS_TOKEN)


def markup_ids(tokenizer: Tokenizer, text: str) -> list[int]:
  """Token ids of `text`: chat markup (see the module doc) when it begins with the BOS marker, else
  plain `tokenizer.encode(text)`."""
  if not is_markup(text):
    return tokenizer.encode(text)
  special = {tok_lib.BOS_TOKEN: tokenizer.bos_id, tok_lib.START_HEADER_TOKEN: tokenizer.start_header_id,
             tok_lib.END_HEADER_TOKEN: tokenizer.end_header_id, tok_lib.EOT_TOKEN: tokenizer.eot_id}
  ids: list[int] = []
  for piece in _MARKER_RE.split(text):
    if piece in special:
      ids.append(special[piece])
    elif piece:
      ids += tokenizer.encode(piece)
  return ids


def cut_at_stops(text: str, until: Sequence[str]) -> str:
  """`text` up to (not including) the earliest occurrence of any non-empty stop sequence."""
  end = len(text)
  for stop in until:
    if stop:
      at = text.find(stop)
      if at != -1:
        end = min(end, at)
  return text[:end]


def stop_sequences(until) -> list[str]:
  """lm-eval's `until`: one string, a list of them, or nothing."""
  if until is None:
    return []
  if isinstance(until, str):
    return [until]
  if isinstance(until, (list, tuple)) and all(isinstance(s, str) for s in until):
    return list(until)
  raise ValueError(f"generation_kwargs until={until!r}: expected a string or a list of strings")


def windows(ids: Sequence[int], max_length: int | None) -> list[tuple[list[int], list[int]]]:
  """(prompt, answer) pieces that score every token of `ids` once, each at most `max_length` long.

  The first piece is the start of the text with no prompt; each later one scores the next
  `max_length // 2` tokens given up to `max_length - that` tokens before them, so every token past
  the first window sees at least half a window of context. No limit: one piece, the whole text.
  """
  ids = list(ids)
  if max_length is None or len(ids) <= max_length:
    return [([], ids)]
  if max_length < 2:
    raise ValueError(f"max_length={max_length}: expected at least 2 to window a long text")
  pieces = [([], ids[:max_length])]
  stride = max_length // 2
  for start in range(max_length, len(ids), stride):
    answer = ids[start:start + stride]
    pieces.append((ids[max(0, start - (max_length - len(answer))):start], answer))
  return pieces


def occurrence_indices(keys: Sequence) -> list[int]:
  """For each entry, how many equal entries came before it (lm-eval repeats a request in place)."""
  seen: dict = {}
  out = []
  for k in keys:
    out.append(seen.get(k, 0))
    seen[k] = out[-1] + 1
  return out

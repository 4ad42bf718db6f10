"""TRL's SFT and preference schemas (llada_jax.data.schemas) through make_source."""

import json
import re

import numpy as np
import pytest

from llada_jax.data import DataError, errors, make_source, schemas, train_sentencepiece

WORDS = "the sky is blue green red what colour today hello you are a helpful assistant cat dog".split()
SYSTEM = {"role": "system", "content": "you are a helpful assistant"}


def user(text):
  return {"role": "user", "content": text}


def assistant(text):
  return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  d = tmp_path_factory.mktemp("tok")
  text = d / "corpus.txt"
  text.write_text("\n".join(" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)) for i in range(200)))
  return train_sentencepiece([str(text)], d / "sp", vocab_size=300)


def _source(tmp_path, kind, rows, name="data.jsonl", **kw):
  path = tmp_path / name
  path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
  return make_source(kind, str(path), kw.pop("tokenizer"), seq_len=256, **kw)


def _examples(tmp_path, kind, rows, tok, name, chat_template=True):
  source = _source(tmp_path, kind, rows, name, tokenizer=tok, chat_template=chat_template)
  return [source.example(i) for i in range(len(source))]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      if k != "example_id":
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)


MULTI_PROMPT = [SYSTEM, user("what colour is the sky"), assistant("blue"), user("and today")]

# id, record, the equivalent explicit plain-text record (None: compared by ids below)
PREFERENCE_EQUIVALENTS = [
    ("implicit_text", {"chosen": "the sky is blue", "rejected": "the sky is green"},
     {"prompt": "the sky is", "chosen": " blue", "rejected": " green"}),
    ("implicit_text_mid_word", {"chosen": "the sky is blue today", "rejected": "the sky is bright"},
     {"prompt": "the sky is", "chosen": " blue today", "rejected": " bright"}),
    ("conversational", {"prompt": [user("what colour is the sky")], "chosen": [assistant("blue")],
                        "rejected": [assistant("red")]},
     {"prompt": "what colour is the sky", "chosen": "blue", "rejected": "red"}),
    ("conversational_implicit", {"chosen": [user("what colour is the sky"), assistant("blue")],
                                 "rejected": [user("what colour is the sky"), assistant("red")]},
     {"prompt": "what colour is the sky", "chosen": "blue", "rejected": "red"}),
]


@pytest.mark.parametrize("chat_template", [True, False])
@pytest.mark.parametrize("record, explicit", [e[1:] for e in PREFERENCE_EQUIVALENTS],
                         ids=[e[0] for e in PREFERENCE_EQUIVALENTS])
def test_preference_schema_equals_explicit_record(tmp_path, tok, record, explicit, chat_template):
  got = _examples(tmp_path, "preference", [record], tok, "a.jsonl", chat_template)
  want = _examples(tmp_path, "preference", [explicit], tok, "b.jsonl", chat_template)
  _assert_same(got, want)


def test_multi_turn_preference_prompts(tmp_path, tok):
  explicit = {"prompt": MULTI_PROMPT, "chosen": [assistant("blue")], "rejected": [assistant("green")]}
  implicit = {"chosen": MULTI_PROMPT + [assistant("blue")], "rejected": MULTI_PROMPT + [assistant("green")]}
  a = _examples(tmp_path, "preference", [explicit], tok, "a.jsonl")
  b = _examples(tmp_path, "preference", [implicit], tok, "b.jsonl")
  _assert_same(a, b)
  prompt = tok.encode_chat(MULTI_PROMPT)
  assert int(a[0]["prompt_lengths"]) == len(prompt)
  assert a[0]["chosen"].tolist() == prompt + tok.encode("blue") + [tok.eos_id]
  assert a[0]["rejected"].tolist() == prompt + tok.encode("green") + [tok.eos_id]
  # The same prompt as the last turn of an SFT dialogue.
  sft = _examples(tmp_path, "sft", [{"messages": MULTI_PROMPT + [assistant("blue")]}], tok, "c.jsonl")
  assert sft[-1]["tokens"].tolist() == a[0]["chosen"].tolist()


@pytest.mark.parametrize("record", [
    {"prompt": "what colour is the sky", "completion": "blue"},
    {"prompt": [user("what colour is the sky")], "completion": [assistant("blue")]},
    {"messages": [user("what colour is the sky"), assistant("blue")]},
], ids=["prompt_completion", "conversational_prompt_completion", "messages"])
def test_sft_schema_equals_prompt_response(tmp_path, tok, record):
  got = _examples(tmp_path, "sft", [record], tok, "a.jsonl")
  want = _examples(tmp_path, "sft", [{"prompt": "what colour is the sky", "response": "blue"}], tok, "b.jsonl")
  _assert_same(got, want)


def test_multi_turn_prompt_completion_equals_dialogue_turn(tmp_path, tok):
  got = _examples(tmp_path, "sft", [{"prompt": MULTI_PROMPT, "completion": [assistant("red")]}], tok, "a.jsonl")
  dialogue = _examples(tmp_path, "sft", [{"messages": MULTI_PROMPT + [assistant("red")]}], tok, "b.jsonl")
  _assert_same(got, dialogue[-1:])


@pytest.mark.parametrize("kind, record, field", [
    ("preference", {"prompt": MULTI_PROMPT, "chosen": [assistant("a")], "rejected": [assistant("b")]}, "prompt"),
    ("preference", {"chosen": MULTI_PROMPT + [assistant("a")], "rejected": MULTI_PROMPT + [assistant("b")]},
     "chosen"),
    ("sft", {"prompt": MULTI_PROMPT, "completion": [assistant("a")]}, "prompt"),
])
def test_multi_message_prompt_needs_chat_template(tmp_path, tok, kind, record, field):
  with pytest.raises(DataError, match=f"line 1, field '{field}': a dialogue with more than one message"):
    _source(tmp_path, kind, [record], tokenizer=tok, chat_template=False)


def test_text_prompt_end():
  assert schemas.text_prompt_end("The sky is blue.", "The sky is green.") == len("The sky is")
  assert schemas.text_prompt_end("The sky is blue.", "The sky is bright.") == len("The sky is")
  assert schemas.text_prompt_end("Q?\n\nA: yes", "Q?\n\nA: no") == len("Q?\n\nA:")
  assert schemas.text_prompt_end("the cat", "the cat sat") == len("the")
  assert schemas.text_prompt_end("blue", "green") == 0


OK_PAIR = [assistant("yes")]
BAD_RECORDS = [
    # id, kind, record, expected "field 'f': message" fragment
    ("pref_missing_all", "preference", {"answer": "x"}, "field 'prompt': missing; expected a string or a list"),
    ("pref_rejected_missing", "preference", {"prompt": "a", "chosen": "b"}, "field 'rejected': missing"),
    ("pref_identical", "preference", {"prompt": "a", "chosen": "b", "rejected": "b"},
     "field 'rejected': chosen and rejected are identical"),
    ("implicit_identical", "preference", {"chosen": "the cat", "rejected": "the cat"},
     "field 'rejected': chosen and rejected are identical"),
    ("implicit_no_shared_words", "preference", {"chosen": "blue sky", "rejected": "green sky"},
     "field 'prompt': no 'prompt', and chosen and rejected share no leading words"),
    ("implicit_mixed", "preference", {"chosen": [user("a"), assistant("b")], "rejected": "c"},
     "field 'rejected': expected a non-empty list of"),
    ("conv_role", "preference", {"prompt": [user("a")], "chosen": [assistant("b"), {"role": "bot", "content": "c"}],
                                 "rejected": OK_PAIR}, "field 'chosen[1].role': role 'bot'; expected one of"),
    ("conv_content", "preference", {"prompt": [{"role": "user", "content": 3}], "chosen": OK_PAIR,
                                    "rejected": [assistant("no")]},
     "field 'prompt[0].content': expected a non-empty string, got int"),
    ("conv_empty_content", "preference", {"prompt": [user("")], "chosen": OK_PAIR, "rejected": [assistant("no")]},
     "field 'prompt[0].content': empty"),
    ("conv_not_object", "preference", {"prompt": ["hi"], "chosen": OK_PAIR, "rejected": [assistant("no")]},
     "field 'prompt[0]': expected an object with 'role' and 'content', got str"),
    ("conv_prompt_ends_with_assistant", "preference",
     {"prompt": [user("a"), assistant("b")], "chosen": OK_PAIR, "rejected": [assistant("no")]},
     "field 'prompt[1].role': the prompt's last message has role 'assistant'; expected a user message last"),
    ("conv_answer_role", "preference", {"prompt": [user("a")], "chosen": [user("b")], "rejected": OK_PAIR},
     "field 'chosen[0].role': role 'user'; expected 'assistant'"),
    ("conv_two_answers", "preference", {"prompt": [user("a")], "chosen": OK_PAIR, "rejected": OK_PAIR * 2},
     "field 'rejected': holds 2 messages; expected exactly one assistant message"),
    ("conv_answer_string", "preference", {"prompt": [user("a")], "chosen": "yes", "rejected": OK_PAIR},
     "field 'chosen': expected a non-empty list of"),
    ("conv_answer_missing", "preference", {"prompt": [user("a")], "chosen": OK_PAIR},
     "field 'rejected': missing; expected a list holding one assistant message"),
    ("conv_identical", "preference", {"prompt": [user("a")], "chosen": OK_PAIR, "rejected": OK_PAIR},
     "field 'rejected[0].content': chosen and rejected are identical"),
    ("conv_implicit_no_shared", "preference", {"chosen": [user("a"), assistant("b")],
                                               "rejected": [user("c"), assistant("d")]},
     "field 'rejected[0]': no 'prompt', and chosen and rejected differ from their first message"),
    ("conv_implicit_two_left", "preference",
     {"chosen": [user("a"), assistant("b"), user("c"), assistant("d")], "rejected": [user("a"), assistant("e")]},
     "field 'chosen': holds 3 messages after the 1 prompt messages it shares; expected exactly one"),
    ("conv_implicit_user_answer", "preference", {"chosen": [user("a"), user("b")], "rejected": [user("a"), user("c")]},
     "field 'chosen[1].role': role 'user'; expected 'assistant'"),
    ("conv_implicit_identical", "preference", {"chosen": [user("a"), assistant("b")],
                                               "rejected": [user("a"), assistant("b")]},
     "field 'rejected': chosen and rejected are identical"),
    ("conv_implicit_prompt_ends_with_system", "preference",
     {"chosen": [SYSTEM, assistant("b")], "rejected": [SYSTEM, assistant("c")]},
     "field 'chosen[0].role': the prompt's last message has role 'system'"),
    ("sft_both_answers", "sft", {"prompt": "a", "response": "b", "completion": "c"},
     "field 'completion': both 'response' and 'completion'"),
    ("sft_completion_missing", "sft", {"prompt": [user("a")]}, "field 'completion': missing"),
    ("sft_completion_role", "sft", {"prompt": [user("a")], "completion": [SYSTEM]},
     "field 'completion[0].role': role 'system'; expected 'assistant'"),
    ("sft_completion_empty", "sft", {"prompt": [user("a")], "completion": []},
     "field 'completion': expected a non-empty list of {\"role\", \"content\"} objects, got an empty list"),
    ("sft_completion_text", "sft", {"prompt": "a", "completion": 5},
     "field 'completion': expected a non-empty string, got int"),
    ("sft_prompt_role", "sft", {"prompt": [{"role": "tool", "content": "x"}], "completion": OK_PAIR},
     "field 'prompt[0].role': role 'tool'"),
    ("sft_nothing", "sft", {"text": "a"}, "field 'prompt': missing; expected 'prompt' and 'response'"),
]


@pytest.mark.parametrize("kind, record, fragment", [b[1:] for b in BAD_RECORDS], ids=[b[0] for b in BAD_RECORDS])
def test_bad_record_names_line_and_field(tmp_path, tok, kind, record, fragment):
  good = ({"prompt": "a", "chosen": "b", "rejected": "c"} if kind == "preference"
          else {"prompt": "a", "response": "b"})
  path = tmp_path / "bad.jsonl"
  with pytest.raises(DataError, match=f"^{re.escape(str(path))}, line 2, {re.escape(fragment)}"):
    _source(tmp_path, kind, [good, record, good], name="bad.jsonl", tokenizer=tok)


def test_record_location_is_named():
  """A record index passed for columnar data (errors.Record) is reported as `record N`."""
  record_cls = getattr(errors, "Record", None)
  if record_cls is None:
    pytest.skip("errors.Record is not available")
  with pytest.raises(DataError, match=r"^d.parquet, record 3, field 'chosen\[0\].role': role 'user'"):
    schemas.preference_example({"prompt": [user("a")], "chosen": [user("b")], "rejected": OK_PAIR},
                               path="d.parquet", line=record_cls(3))


def test_tokenizer_training_reads_every_schema(tmp_path):
  from llada_jax.data.tokenizer import iter_training_text

  path = tmp_path / "mixed.jsonl"
  rows = [{"prompt": [user("alpha")], "chosen": [assistant("beta")], "rejected": [assistant("gamma")]},
          {"chosen": [user("delta"), assistant("eps")], "rejected": "zeta"},
          {"prompt": "eta", "completion": [assistant("theta")]}, {"prompt": "iota", "completion": "kappa"}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert sorted(iter_training_text([str(path)])) == sorted(
      "alpha beta gamma delta eps zeta eta theta iota kappa".split())

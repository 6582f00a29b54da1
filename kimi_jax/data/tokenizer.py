"""Tokenizers in the Hugging Face `tokenizer.json` format, through the `tokenizers` package.

`load_tokenizer` reads a checkpoint directory the way transformers does: `tokenizer.json` for
the vocabulary, `tokenizer_config.json` for the special tokens (strings or AddedToken dicts) and
the chat template (also read from `chat_template.jinja`, where transformers 5 writes it). Where
the tokenizer config names no eos token, the ids come from `generation_config.json` or
`config.json` (`eos_token_id` may be one id or a list: a chat model stops at any of them).
`char_tokenizer` builds the small character-level tokenizer of our synthetic tasks, saved in the
same format so SGLang and transformers read it too.
"""
import json
import os

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from kimi_jax.data.chat_template import JinjaChatTemplate

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")


class Tokenizer:
  """Thin wrapper: encode/decode, the special ids the trainer needs, the chat template."""

  def __init__(self, hf_tokenizer: tokenizers.Tokenizer, bos_id: int | None,
               eos_ids: list[int], pad_id: int, chat_template: str | None = None):
    if not eos_ids:
      raise ValueError("a tokenizer needs at least one eos id")
    self.hf = hf_tokenizer
    self.bos_id, self.eos_ids, self.pad_id = bos_id, list(eos_ids), pad_id
    self.eos_id = self.eos_ids[0]  # appended after SFT responses
    self.chat_template = (None if chat_template is None else
                          JinjaChatTemplate(chat_template, self.special_tokens()))

  @property
  def vocab_size(self) -> int:
    return self.hf.get_vocab_size()

  def encode(self, text: str) -> list[int]:
    return self.hf.encode(text, add_special_tokens=False).ids

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def special_tokens(self) -> dict[str, str]:
    ids = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_id}
    return {name: self.hf.id_to_token(i) for name, i in ids.items() if i is not None}

  def save(self, directory: str) -> None:
    """Write tokenizer.json + tokenizer_config.json (HF layout, chat template included)."""
    os.makedirs(directory, exist_ok=True)
    self.hf.save(os.path.join(directory, TOKENIZER_FILE))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "bos_token": None, **self.special_tokens()}
    if self.chat_template is not None:
      config["chat_template"] = self.chat_template.source
    with open(os.path.join(directory, TOKENIZER_CONFIG_FILE), "w") as f:
      json.dump(config, f, indent=2)


def char_tokenizer(charset: str) -> Tokenizer:
  """One token per character of `charset`, plus <pad>=0, <bos>=1, <eos>=2, <unk>=3."""
  if len(set(charset)) != len(charset):
    raise ValueError(f"charset has repeated characters: {charset!r}")
  vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK] + list(charset))}
  hf_tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=UNK))
  hf_tok.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex("."), behavior="isolated")
  hf_tok.decoder = decoders.Fuse()
  hf_tok.add_special_tokens([PAD, BOS, EOS, UNK])
  return Tokenizer(hf_tok, bos_id=1, eos_ids=[2], pad_id=0)


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from e


def _token_id(hf: tokenizers.Tokenizer, value, source: str) -> int | None:
  """Id of a special token given as a string or an AddedToken dict ({"content": ...})."""
  token = value.get("content") if isinstance(value, dict) else value
  if token is None:
    return None
  token_id = hf.token_to_id(token)
  if token_id is None:
    raise ValueError(f"{source}: special token {token!r} is not in the vocabulary")
  return token_id


def _config_ids(directory: str, key: str) -> list[int]:
  """`key` (one id or a list) from generation_config.json, else config.json."""
  for name in ("generation_config.json", "config.json"):
    value = _read_json(os.path.join(directory, name)).get(key)
    if value is not None:
      return [value] if isinstance(value, int) else list(value)
  return []


def _chat_template(directory: str, tokenizer_config: dict) -> str | None:
  path = os.path.join(directory, CHAT_TEMPLATE_FILE)
  if os.path.exists(path):
    with open(path) as f:
      return f.read()
  template = tokenizer_config.get("chat_template")
  if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use"...}]
    template = {t["name"]: t["template"] for t in template}.get("default")
  return template


def load_tokenizer(path: str) -> Tokenizer:
  """The tokenizer of a checkpoint directory (or a tokenizer.json file)."""
  file = os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else path
  if not os.path.exists(file):
    raise FileNotFoundError(f"{file}: no tokenizer.json")
  directory = os.path.dirname(file)
  hf = tokenizers.Tokenizer.from_file(file)
  config_file = os.path.join(directory, TOKENIZER_CONFIG_FILE)
  config = _read_json(config_file)
  ids = {name: _token_id(hf, config.get(name), f"{config_file}: {name}") for name in SPECIAL_NAMES}
  eos_ids = _config_ids(directory, "eos_token_id")
  if ids["eos_token"] is not None:  # the tokenizer's eos first: SFT responses end with it
    eos_ids = [ids["eos_token"]] + [i for i in eos_ids if i != ids["eos_token"]]
  if not eos_ids:
    raise ValueError(f"{directory}: no eos token: set eos_token in {TOKENIZER_CONFIG_FILE} or "
                     "eos_token_id in config.json / generation_config.json")
  bos_id = ids["bos_token"]
  if bos_id is None and (config_bos := _config_ids(directory, "bos_token_id")):
    bos_id = config_bos[0]
  pad_id = ids["pad_token"]
  if pad_id is None:
    pad_id = next(iter(_config_ids(directory, "pad_token_id")), eos_ids[0])
  return Tokenizer(hf, bos_id, eos_ids, pad_id, _chat_template(directory, config))

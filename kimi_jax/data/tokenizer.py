"""Tokenizers in the Hugging Face `tokenizer.json` format, through the `tokenizers` package.

`load_tokenizer` reads any local tokenizer.json; `char_tokenizer` builds the small
character-level tokenizer of our synthetic tasks, saved in the same format so SGLang and
transformers read it too.
"""
import json
import os

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
TOKENIZER_FILE = "tokenizer.json"


class Tokenizer:
  """Thin wrapper: encode/decode plus the special ids the trainer needs."""

  def __init__(self, hf_tokenizer: tokenizers.Tokenizer, bos: str | None, eos: str, pad: str):
    self.hf = hf_tokenizer
    self.bos_id = None if bos is None else self._id(bos)
    self.eos_id = self._id(eos)
    self.pad_id = self._id(pad)

  def _id(self, token: str) -> int:
    token_id = self.hf.token_to_id(token)
    if token_id is None:
      raise ValueError(f"tokenizer has no special token {token!r}")
    return token_id

  @property
  def vocab_size(self) -> int:
    return self.hf.get_vocab_size()

  def encode(self, text: str) -> list[int]:
    return self.hf.encode(text, add_special_tokens=False).ids

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def save(self, directory: str) -> None:
    """Write tokenizer.json + tokenizer_config.json (HF layout)."""
    os.makedirs(directory, exist_ok=True)
    self.hf.save(os.path.join(directory, TOKENIZER_FILE))
    special = {"pad_token": self.hf.id_to_token(self.pad_id),
               "eos_token": self.hf.id_to_token(self.eos_id),
               "bos_token": None if self.bos_id is None else self.hf.id_to_token(self.bos_id)}
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
      json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                 **special}, f, indent=2)


def char_tokenizer(charset: str) -> Tokenizer:
  """One token per character of `charset`, plus <pad>=0, <bos>=1, <eos>=2, <unk>=3."""
  if len(set(charset)) != len(charset):
    raise ValueError(f"charset has repeated characters: {charset!r}")
  vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK] + list(charset))}
  hf_tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=UNK))
  hf_tok.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex("."), behavior="isolated")
  hf_tok.decoder = decoders.Fuse()
  hf_tok.add_special_tokens([PAD, BOS, EOS, UNK])
  return Tokenizer(hf_tok, BOS, EOS, PAD)


def load_tokenizer(path: str) -> Tokenizer:
  """Load `path`/tokenizer.json (or the file itself); special tokens from tokenizer_config."""
  file = os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else path
  if not os.path.exists(file):
    raise FileNotFoundError(f"{file}: no tokenizer.json")
  config_file = os.path.join(os.path.dirname(file), "tokenizer_config.json")
  special = {}
  if os.path.exists(config_file):
    with open(config_file) as f:
      special = json.load(f)
  name = lambda v: v.get("content") if isinstance(v, dict) else v
  eos = name(special.get("eos_token")) or EOS
  pad = name(special.get("pad_token")) or eos
  return Tokenizer(tokenizers.Tokenizer.from_file(file), name(special.get("bos_token")), eos, pad)

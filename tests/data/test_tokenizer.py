"""Character tokenizer: lossless round trip and HF-format compatibility."""
import pytest
import transformers

from kimi_jax.data.tokenizer import char_tokenizer, load_tokenizer

CHARSET = "0123456789+-=,#"


def test_round_trip_and_special_ids():
  tok = char_tokenizer(CHARSET)
  text = "12+3=15,15-7=8#8"
  ids = tok.encode(text)
  assert len(ids) == len(text)  # exactly one token per character
  assert tok.decode(ids + [tok.eos_id]) == text
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert tok.vocab_size == 4 + len(CHARSET)


def test_saved_tokenizer_loads_in_ours_and_transformers(tmp_path):
  tok = char_tokenizer(CHARSET)
  tok.save(str(tmp_path))
  text = "7-9=-2#-2"
  assert load_tokenizer(str(tmp_path)).encode(text) == tok.encode(text)
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert hf_tok(text, add_special_tokens=False).input_ids == tok.encode(text)
  assert hf_tok.eos_token_id == tok.eos_id


def test_repeated_characters_rejected():
  with pytest.raises(ValueError, match="repeated"):
    char_tokenizer("0123456789+-0")

"""HF checkpoint tokenizers: special ids and chat templates equal transformers' own."""
import json
import os

import pytest
import transformers

from kimi_jax.data.chat_template import ChatTemplateError, JinjaChatTemplate
from kimi_jax.data.tokenizer import load_tokenizer
from tests.hf_checkpoints import save_bpe_tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "What is 6 * 7? Put the answer in \\boxed{}."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
     {"role": "assistant", "content": "2"}, {"role": "user", "content": "and 2+2?"}],
]


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("bpe"))
  save_bpe_tokenizer(directory)
  return directory


@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}, {"enable_thinking": True}])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_chat_template_ids_equal_transformers(checkpoint_dir, conversation, kwargs):
  ours = load_tokenizer(checkpoint_dir)
  theirs = transformers.AutoTokenizer.from_pretrained(checkpoint_dir)
  text = ours.chat_template.render(conversation, add_generation_prompt=True, **kwargs)
  expected = theirs.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False,
                                        **kwargs)
  assert text == expected
  expected_ids = theirs.apply_chat_template(conversation, add_generation_prompt=True,
                                            tokenize=True, return_dict=True, **kwargs)["input_ids"]
  assert ours.encode(text) == list(expected_ids)


def test_special_ids_from_tokenizer_config(checkpoint_dir):
  ours = load_tokenizer(checkpoint_dir)
  theirs = transformers.AutoTokenizer.from_pretrained(checkpoint_dir)
  assert (ours.eos_id, ours.pad_id, ours.bos_id) == (theirs.eos_token_id, theirs.pad_token_id,
                                                       theirs.bos_token_id)


def test_eos_from_config_json_when_tokenizer_config_is_missing(tmp_path):
  hf_tok = save_bpe_tokenizer(str(tmp_path), chat_template=None, with_special_config=False)
  assert not os.path.exists(tmp_path / "tokenizer_config.json")
  end, im_end = (hf_tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>"))
  (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": end}))
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [im_end, end]}))
  tok = load_tokenizer(str(tmp_path))
  assert tok.eos_ids == [im_end, end]  # generation_config wins, as in transformers' generate
  assert tok.pad_id == im_end and tok.chat_template is None


def test_no_eos_anywhere_names_the_files(tmp_path):
  save_bpe_tokenizer(str(tmp_path), chat_template=None, with_special_config=False)
  with pytest.raises(ValueError, match="eos_token_id in config.json"):
    load_tokenizer(str(tmp_path))


def test_saved_tokenizer_keeps_the_chat_template(checkpoint_dir, tmp_path):
  load_tokenizer(checkpoint_dir).save(str(tmp_path))
  reloaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  original = transformers.AutoTokenizer.from_pretrained(checkpoint_dir)
  assert reloaded.chat_template == original.chat_template
  assert reloaded.eos_token == original.eos_token


def test_template_errors_name_the_line():
  with pytest.raises(ChatTemplateError, match="line 2"):
    JinjaChatTemplate("{% for m in messages %}\n{{ m['content'] }\n{% endfor %}")
  template = JinjaChatTemplate("{{ raise_exception('roles must alternate') }}")
  with pytest.raises(ChatTemplateError, match="roles must alternate"):
    template.render([{"role": "user", "content": "x"}])

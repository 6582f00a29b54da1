"""Tiny HF checkpoints built here: a byte-level BPE tokenizer trained locally with Qwen-style
chat special tokens and template, saved through transformers (the real HF layout:
tokenizer.json, tokenizer_config.json, chat_template.jinja), beside a tiny random Qwen2 model,
so tests read exactly what a downloaded checkpoint holds."""
import os

import jax
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from kimi_jax.checkpointing.hf import save_hf
from kimi_jax.model import ModelConfig, init_params

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# The shape of Qwen's templates: system default, think block switched by `enable_thinking`.
QWEN_STYLE_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}")

CORPUS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips.",
    "How many clips did Natalia sell altogether in April and May? #### 72",
    "The answer is \\boxed{42}. Let me think step by step: 6 * 7 = 42.",
    "def solve():\n    a, b = map(int, input().split())\n    print(a + b)\n",
    "You are a helpful assistant. Please reason step by step, and put your final answer.",
    "0123456789 + - * / = ( ) { } [ ] <think> </think> #### \\boxed",
] * 20


def train_bpe(vocab_size: int = 400) -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS, trainer)
  return tok


def save_bpe_tokenizer(directory: str, chat_template: str | None = QWEN_STYLE_TEMPLATE,
                       with_special_config: bool = True) -> transformers.PreTrainedTokenizerFast:
  """Save through transformers; without `with_special_config` only tokenizer.json is written
  (the eos then has to come from config.json)."""
  kwargs = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>") if with_special_config else {}
  hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=train_bpe(), **kwargs)
  if chat_template is not None:
    hf_tok.chat_template = chat_template
  if with_special_config:
    hf_tok.save_pretrained(directory)
  else:
    os.makedirs(directory, exist_ok=True)
    hf_tok.backend_tokenizer.save(os.path.join(directory, "tokenizer.json"))
  return hf_tok


def save_tiny_qwen2_checkpoint(directory: str, with_special_config: bool = True,
                               seed: int = 0,
                               chat_template: str | None = QWEN_STYLE_TEMPLATE) -> ModelConfig:
  """A random 2-layer Qwen2 with the BPE tokenizer; without `with_special_config` only
  tokenizer.json is written and the eos id lives in config.json alone."""
  hf_tok = save_bpe_tokenizer(directory, chat_template, with_special_config)
  config = ModelConfig(vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True,
                       eos_token_id=hf_tok.convert_tokens_to_ids("<|im_end|>"))
  save_hf(directory, config, init_params(config, jax.random.key(seed)))
  return config

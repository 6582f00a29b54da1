"""Serve an HF-format directory with RolloutEngine behind SGLang's native HTTP API.

  python -m launch.serve --model_path=DIR --port=30000

DIR holds config.json + *.safetensors (as written by `save_hf` or transformers) and, optionally,
the HF tokenizer files (tokenizer.json enables `text` prompts, `text` in answers and stop strings;
the eos ids come from tokenizer_config.json, generation_config.json or config.json, and generation
stops at any); --tokenizer_path names another directory, as SGLang's --tokenizer-path does.
Without a tokenizer the server answers like SGLang's --skip-tokenizer-init: token ids only.
A vision-language checkpoint (Qwen2-VL / Qwen2.5-VL) also takes `image_data` in /generate,
preprocessed per its preprocessor_config.json (Qwen2-VL's defaults without one).
Prints "serving <url>" once bound
(--port=0 picks a free port).
"""
import asyncio
import os

from absl import app, flags

from kimi_jax.checkpointing.hf import load_hf
from kimi_jax.data.images import load_image_processing
from kimi_jax.data.tokenizer import TOKENIZER_FILE, load_tokenizer
from kimi_jax.rollout.engine import RolloutEngine
from kimi_jax.rollout.server import RolloutServer

MODEL_PATH = flags.DEFINE_string("model_path", None, "HF directory: config.json + safetensors")
TOKENIZER_PATH = flags.DEFINE_string("tokenizer_path", None,
                                     "directory with tokenizer.json (default: --model_path)")
HOST = flags.DEFINE_string("host", "127.0.0.1", "interface to bind")
PORT = flags.DEFINE_integer("port", 30000, "port to bind (0 = any free port)")
MAX_BATCH = flags.DEFINE_integer("max_batch", 64, "rows decoded together")
MAX_SEQ_LEN = flags.DEFINE_integer("max_seq_len", 2048, "prompt + output tokens per request")
CHUNK_STEPS = flags.DEFINE_integer("chunk_steps", 16, "decode steps per device program")
WEIGHT_VERSION = flags.DEFINE_string("weight_version", "default", "initial weight version")
REPETITION_NGRAM = flags.DEFINE_integer("repetition_ngram", 0, "loop period bound (0 = off)")
REPETITION_COUNT = flags.DEFINE_integer("repetition_count", 0, "repeats that stop a sample")


def build_server(model_path: str, tokenizer_path: str | None = None) -> RolloutServer:
  config, params = load_hf(model_path)
  if tokenizer_path is not None:
    tokenizer = load_tokenizer(tokenizer_path)
  elif os.path.exists(os.path.join(model_path, TOKENIZER_FILE)):
    tokenizer = load_tokenizer(model_path)
  else:
    tokenizer = None
  eos = {config.eos_token_id, *([] if tokenizer is None else tokenizer.eos_ids)} - {None}
  engine = RolloutEngine(config, params, max_batch=MAX_BATCH.value, max_seq_len=MAX_SEQ_LEN.value,
                         eos_token_ids=sorted(eos), weight_version=WEIGHT_VERSION.value,
                         repetition_ngram=REPETITION_NGRAM.value,
                         repetition_count=REPETITION_COUNT.value, chunk_steps=CHUNK_STEPS.value,
                         detokenize=None if tokenizer is None else tokenizer.decode)
  return RolloutServer(engine, tokenizer=tokenizer, model_path=model_path,
                       image_processing=load_image_processing(model_path))


async def serve(server: RolloutServer) -> None:
  url = await server.start(HOST.value, PORT.value)
  print(f"serving {url}", flush=True)
  try:
    await asyncio.Event().wait()  # until the process is stopped
  finally:
    await server.stop()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not MODEL_PATH.value:
    raise app.UsageError("--model_path is required")
  asyncio.run(serve(build_server(MODEL_PATH.value, TOKENIZER_PATH.value)))


if __name__ == "__main__":
  app.run(main)

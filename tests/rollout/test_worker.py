"""The engine worker's command order: an abort or pause-abort reaches the requests submitted
before it, even when both commands wait for the worker thread together, and spares the ones
submitted after it."""
import asyncio

from kimi_jax.rollout.engine import RolloutEngine, SamplingParams
from kimi_jax.rollout.worker import EngineWorker
from tests.rollout.tiny_model import CFG, peaked_params

LONG = SamplingParams(temperature=1.0, max_new_tokens=30, ignore_eos=True, seed=1)


def finish_reasons(commands) -> list[dict]:
  """Each request's finish reason when `commands(worker, submit)` queue their commands while
  the worker thread is held off, so that all of them wait for it together."""
  async def scenario():
    worker = EngineWorker(RolloutEngine(CFG, peaked_params(0), max_batch=4, max_seq_len=40))
    worker.start()
    done: dict[str, asyncio.Future] = {}

    def submit(rid: str):
      done[rid] = asyncio.get_running_loop().create_future()
      sink = lambda update: (update.completion is not None
                             and done[rid].set_result(update.completion.finish_reason))
      return worker.submit([[3, 4, 5]], [LONG], [rid], [[rid]], sink)

    with worker._wake:  # the worker thread waits on this lock for its next command
      futures = commands(worker, submit)
    await asyncio.gather(*futures)
    reasons = [await asyncio.wait_for(done[rid], 60) for rid in sorted(done)]
    worker.stop()
    return reasons

  return asyncio.run(scenario())


def test_an_abort_reaches_the_request_submitted_just_before_it():
  reasons = finish_reasons(lambda worker, submit: [
      submit("a"), submit("b"), worker.abort(["a"], "aborted by /abort_request")])
  assert reasons == [{"type": "abort", "message": "aborted by /abort_request"},
                     {"type": "length", "length": 30}]


def test_a_pause_abort_ends_earlier_requests_and_holds_later_ones():
  def commands(worker, submit):
    return [submit("a"), worker.set_paused(True, "aborted by /pause_generation"), submit("b"),
            worker.set_paused(False)]
  assert finish_reasons(commands) == [{"type": "abort", "message": "aborted by /pause_generation"},
                                      {"type": "length", "length": 30}]

"""Our SGLang-API server recording what reaches it, in arrival order: each request's seed and
each call that acts on the whole server (weight update, memory release and resume)."""
from kimi_jax.rollout.engine import RolloutEngine
from kimi_jax.rollout.server import RolloutServer


class RecordingEngine(RolloutEngine):
  """Records the seed of every request it is given in `events`."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.events = []

  def submit(self, prompts, sampling, images=None):
    self.events += [("generate", sp.seed) for sp in sampling]
    return super().submit(prompts, sampling, images)


class RecordingRolloutServer(RolloutServer):
  """Our SGLang-API server adding to its engine's `events` each call that acts on the fleet:
  a weight update (with the version it then serves), memory release and resume."""

  async def update_weights_from_disk(self, request):
    response = await super().update_weights_from_disk(request)
    self.engine.events.append(("update", self.engine.weight_version))
    return response

  async def release_memory_occupation(self, request):
    self.engine.events.append(("release",))
    return await super().release_memory_occupation(request)

  async def resume_memory_occupation(self, request):
    self.engine.events.append(("resume",))
    return await super().resume_memory_occupation(request)

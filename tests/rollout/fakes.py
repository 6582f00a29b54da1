"""A base for scripted test backends implementing `RolloutBackend`."""


class FakeBackend:
  """Subclasses script `generate`; weight syncs and memory calls are recorded in `events`."""

  def __init__(self):
    self.events = []

  def generate(self, requests, sampling, images=None):
    raise NotImplementedError("a fake backend scripts its own generate")

  def sync(self, params, version: str) -> None:
    self.events.append(("sync", version))

  def release(self) -> None:
    self.events.append(("release",))

  def resume(self) -> None:
    self.events.append(("resume",))

  def close(self) -> None:
    self.events.append(("close",))

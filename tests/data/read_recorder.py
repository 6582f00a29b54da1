"""A sequence that records which of its items were read, in order."""
import collections.abc


class ReadRecorder(collections.abc.Sequence):

  def __init__(self, items):
    self.items, self.reads = items, []

  def __len__(self):
    return len(self.items)

  def __getitem__(self, index):
    self.reads.append(index)
    return self.items[index]

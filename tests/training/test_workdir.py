"""Remote workdirs: files written locally, mirrored by `sync`, pulled back on resume."""
import json
import os

import pytest
from etils import epath

from kimi_jax.training.workdir import RunDirectory, is_remote


def test_uris_are_remote_local_paths_are_not():
  assert is_remote("gs://bucket/run") and is_remote(epath.Path("s3://bucket/run"))
  assert not is_remote("runs/demo") and not is_remote("/tmp/run")


def test_a_local_workdir_is_written_in_place(tmp_path):
  with RunDirectory(str(tmp_path)) as run_dir:
    assert run_dir.local == str(tmp_path) and not run_dir.staged


def test_a_staged_workdir_mirrors_new_and_changed_files_and_resumes_from_them(tmp_path):
  # The remote side is a local directory here: this machine has no bucket. The code path is
  # the one a gs:// workdir takes (staged=True is what a URI selects).
  remote = tmp_path / "remote"
  with RunDirectory(str(remote), staged=True, unsynced=("rollout_weights",)) as run_dir:
    local = run_dir.local
    assert local != str(remote) and os.listdir(local) == []
    with open(os.path.join(local, "metrics.jsonl"), "w") as f:
      f.write('{"step": 1}\n')
    os.makedirs(os.path.join(local, "samples"))
    with open(os.path.join(local, "samples", "iter_00000.jsonl"), "w") as f:
      f.write("{}\n")
    os.makedirs(os.path.join(local, "rollout_weights"))
    with open(os.path.join(local, "rollout_weights", "model.safetensors"), "w") as f:
      f.write("scratch")
    run_dir.sync()
    assert (remote / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert (remote / "samples" / "iter_00000.jsonl").read_text() == "{}\n"
    assert not (remote / "rollout_weights").exists()
    with open(os.path.join(local, "metrics.jsonl"), "a") as f:
      f.write('{"step": 2}\n')
  # Closing synced the change and removed the staging directory.
  assert not os.path.exists(local)
  assert (remote / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
  (remote / "checkpoints" / "2").mkdir(parents=True)  # orbax's, never copied down
  (remote / "checkpoints" / "2" / "state").write_text("orbax")
  with RunDirectory(str(remote), staged=True) as resumed:
    with open(os.path.join(resumed.local, "metrics.jsonl")) as f:
      assert f.read() == '{"step": 1}\n{"step": 2}\n'
    assert sorted(os.listdir(resumed.local)) == ["metrics.jsonl", "samples"]


@pytest.mark.slow
def test_rl_run_in_a_staged_workdir_writes_everything_there(tmp_path, monkeypatch):
  # The path a gs:// workdir takes, with a local directory standing in for the bucket: the run
  # writes in a staging directory, every file but the SGLang weights scratch reaches the
  # workdir, and orbax writes the checkpoints there directly.
  from experiments import rl_arith
  from kimi_jax.training import rl, workdir
  monkeypatch.setattr(workdir, "is_remote", lambda path: True)
  sync, synced_from = workdir.RunDirectory.sync, []
  monkeypatch.setattr(workdir.RunDirectory, "sync",
                      lambda self: synced_from.append(self.local) or sync(self))
  config = rl_arith.get_config("smoke")
  config.rl.iterations = 2
  summary = rl.run(config, str(tmp_path))
  assert len(synced_from) == 3  # after each iteration and at the end
  assert str(tmp_path) not in synced_from and not os.path.exists(synced_from[0])
  assert sorted(os.listdir(tmp_path)) == [
      "checkpoints", "hf", "hf_sft", "metrics.jsonl", "rl_curves.png", "samples",
      "sft_metrics.jsonl", "summary.json", "tokenizer"]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
  assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [0, 1, 2]
  assert json.loads((tmp_path / "summary.json").read_text()) == summary
  assert sorted(os.listdir(tmp_path / "samples")) == ["iter_00000.jsonl", "iter_00001.jsonl"]


@pytest.mark.slow
def test_sft_eval_and_long2short_stages_in_staged_workdirs_write_everything_there(
    tmp_path, monkeypatch):
  # Each stage in the path a gs:// workdir takes (a local directory stands in for the bucket):
  # its files are written in a staging directory that is gone afterwards, and reach the workdir.
  from absl import flags
  from experiments import long2short_arith, rl_arith
  from kimi_jax.training import long2short_run, sft_run, workdir
  from launch import eval as eval_launch
  monkeypatch.setattr(workdir, "is_remote", lambda path: True)
  staged = []
  init = workdir.RunDirectory.__init__
  monkeypatch.setattr(workdir.RunDirectory, "__init__",
                      lambda self, *a, **kw: init(self, *a, **kw) or staged.append(self.local))
  config = rl_arith.get_config("smoke")
  config.sft.steps = 2
  summary = sft_run.run(config, str(tmp_path / "sft"))
  assert sorted(os.listdir(tmp_path / "sft")) == [
      "hf", "sft_metrics.jsonl", "sft_summary.json", "tokenizer"]
  assert json.loads((tmp_path / "sft" / "sft_summary.json").read_text()) == summary
  assert len((tmp_path / "sft" / "sft_metrics.jsonl").read_text().splitlines()) >= 1

  hf = str(tmp_path / "sft" / "hf")
  flags.FLAGS(["eval", f"--config={rl_arith.__file__}:smoke",
               f"--workdir={tmp_path / 'eval'}", f"--checkpoints=sft={hf}"])
  try:
    eval_launch.main(["eval"])
  finally:
    flags.FLAGS.unparse_flags()
  assert sorted(os.listdir(tmp_path / "eval")) == ["eval.json", "eval.png", "eval_table.md"]
  assert (json.loads((tmp_path / "eval" / "eval.json").read_text())["sft"]["eval/pass@1"]
          == summary["sft/pass@1"])  # the same held-out prompts, greedy, the same checkpoint

  config = long2short_arith.get_config("merge,smoke")
  config.init.checkpoint = config.long2short.short_checkpoint = hf
  results = long2short_run.run(config, str(tmp_path / "l2s"))
  assert sorted(os.listdir(tmp_path / "l2s")) == ["eval", "hf", "tokenizer"]
  assert sorted(os.listdir(tmp_path / "l2s" / "eval")) == ["eval.json", "eval.png",
                                                           "eval_table.md"]
  written = json.loads((tmp_path / "l2s" / "eval" / "eval.json").read_text())
  assert {name: {k: v for k, v in row.items() if k != "checkpoint"}
          for name, row in written.items()} == results
  assert len(staged) == 3 and not any(os.path.exists(local) for local in staged)

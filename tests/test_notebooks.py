"""The ablation notebooks execute at their smallest size and their results point the right way."""
import json
import os

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def execute(name, workdir, monkeypatch):
  monkeypatch.setenv("KIMI_NOTEBOOK_SIZE", "smoke")
  monkeypatch.setenv("KIMI_NOTEBOOK_WORKDIR", str(workdir))
  notebook = nbformat.read(os.path.join(REPO, "notebooks", f"{name}.ipynb"), as_version=4)
  NotebookClient(notebook, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": REPO}}).execute()
  with open(os.path.join(str(workdir), "summary.json")) as f:
    return json.load(f)


@pytest.mark.slow
def test_tau_ablation_larger_tau_smaller_kl_at_every_grid_point(tmp_path, monkeypatch):
  summary = execute("tau_ablation", tmp_path, monkeypatch)
  taus = ("0.01", "0.1", "0.4")  # the whole grid, in order: no comparison is left out
  mean_kl = [summary[t]["mean_kl_prev"] for t in taus]
  assert all(k > 0 for k in mean_kl), mean_kl  # k3 is non-negative; 0 would mean no update
  assert mean_kl[0] > mean_kl[1] > mean_kl[2], mean_kl
  assert os.path.exists(tmp_path / "kl_by_tau.png")


@pytest.mark.slow
def test_length_penalty_ablation_shortens_responses_with_correct_answers(tmp_path, monkeypatch):
  summary = execute("length_penalty_ablation", tmp_path, monkeypatch)
  # Both branches of the k1.5 length reward act only if some responses are correct.
  assert all(summary[w]["correct_responses"] > 0 for w in ("0.0", "1.0")), summary
  assert summary["1.0"]["final_length_mean"] < summary["0.0"]["final_length_mean"], summary
  assert os.path.exists(tmp_path / "length_by_weight.png")

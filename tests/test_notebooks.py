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
def test_tau_ablation_larger_tau_smaller_kl(tmp_path, monkeypatch):
  summary = execute("tau_ablation", tmp_path, monkeypatch)
  kl = [summary[t]["mean_abs_kl_prev"] for t in ("0.01", "1.0", "10.0")]
  assert kl[0] > kl[1] > 0 and kl[0] > kl[2], kl
  assert os.path.exists(tmp_path / "kl_by_tau.png")


@pytest.mark.slow
def test_length_penalty_ablation_shortens_responses(tmp_path, monkeypatch):
  summary = execute("length_penalty_ablation", tmp_path, monkeypatch)
  assert summary["1.0"]["final_length_mean"] < summary["0.0"]["final_length_mean"], summary
  assert os.path.exists(tmp_path / "length_by_weight.png")

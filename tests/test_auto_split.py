"""`--split_k=auto`: the engine's per-client cuts are the deepest that fit each client's memory budget."""

import pytest

import engine_worker
from fellrec_jax.data import prepare_dataset
from federated import experiment, resources


@pytest.mark.slow  # compiles the client segments at every cut (a minute on 2 busy cores)
def test_auto_split_cuts_respect_each_clients_budget(tmp_path):
  """Budgets placed between the footprints of consecutive cuts (and one above the deepest): each client
  gets the deepest cut whose footprint fits its budget, so the expected cuts are known by construction."""
  probe = engine_worker.make_config(str(tmp_path / "probe"), warm_start_steps=0)
  prep, _ = prepare_dataset("synthetic", num_clients=probe.num_clients, partition=probe.partition, seed=probe.seed,
                            synthetic_kwargs=engine_worker.SYNTHETIC)
  model = experiment.load_model(probe, list(prep.titles))
  config = model[0]
  seq_len = int(experiment.task_examples(probe, config, model[2], prep)[0][0].seq_len)
  mib = [resources.client_footprint_bytes(config, k, probe.batch_size, seq_len, server_lora=probe.server_lora)
         / resources.MIB for k in range(config.num_layers)]
  assert all(a < b for a, b in zip(mib, mib[1:])), mib  # the premise: a deeper cut holds more on the client
  last = config.num_layers - 1
  budgets = ((mib[0] + mib[1]) / 2, (mib[1] + mib[2]) / 2, 2 * mib[last])
  expected = [0, 1, last]
  cfg = engine_worker.make_config(str(tmp_path / "run"), warm_start_steps=0, split_k=("auto",),
                                  client_memory_budget_mb=budgets)
  eng = experiment.build_engine(cfg, "fellrec", prep, model)
  assert list(eng.cuts) == expected, (eng.cuts, budgets, mib)
  for k, budget in zip(eng.cuts, budgets):
    assert mib[k] <= budget and (k == last or mib[k + 1] > budget)

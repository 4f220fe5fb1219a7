"""The training loop on a tiny crucible1: records, probes, loss, purity."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import single_trace, tiny_config

from jaxdt.data import corpus as corpus_lib
from jaxdt.io import metadata
from jaxdt.io import tensorfile
from jaxdt.numerics import lattice
from jaxdt.numerics import ordered
from jaxdt.training import loop
from jaxdt.training import runs
from jaxdt import probes
from jaxdt.training import initial
from jaxdt.training import step as step_lib


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
  cfg = tiny_config(tiny_data, steps=30)
  out = str(tmp_path_factory.mktemp("run"))
  result = loop.train(cfg, out, progress=False)
  return cfg, result, tensorfile.TrajectoryReader(result.trajectory)


def test_file_has_the_lab_keys_dtypes_and_shapes(run):
  cfg, result, r = run
  n = r.shape("dead_indices")[0]
  want = {"W": ("uint16", (31, n, 32)), "delta_W_prime": ("float32", (30, n, 32)),
          "centroid": ("float32", (31, 32)), "loss": ("float32", (31,)),
          "last_motion_step": ("int32", (n,)), "dead_mask": ("bool", (256,)),
          "dead_indices": ("int64", (n,))}
  for k, (dt, shape) in want.items():
    assert (str(r.dtype(k)), r.shape(k)) == (dt, shape), k
  assert np.isnan(r.read("loss")[0])
  assert metadata.is_complete(result.run_dir, cfg.store.trajectory_name)
  meta = metadata.read_metadata(result.run_dir)
  for key in ("experiment", "total_steps", "learning_rate", "n_dead_tokens", "final_loss",
              "total_epochs", "data_shapes", "config", "jax_version", "backend", "cpu_threads",
              "wall_time_s", "data_files"):
    assert key in meta, key
  assert meta["completed"] is True


def test_loss_falls(run):
  loss = run[2].read("loss")
  assert loss[-5:].mean() < loss[1:6].mean() - 0.1


def test_loss_is_bf16_representable(run):
  loss = run[2].read("loss")[1:]
  np.testing.assert_array_equal(loss, loss.astype(jnp.bfloat16).astype(np.float32))


def test_delta_w_prime_and_centroid_recompute_from_stored_w_bit_for_bit(run):
  r = run[2]
  w = r.read("W").view(jnp.bfloat16)
  dwp = np.asarray(lattice.lattice_displacement(w[:-1], w[1:]))
  np.testing.assert_array_equal(dwp.view(np.uint32), r.read("delta_W_prime").view(np.uint32))
  cen = np.stack([ordered.np_mean_rows(w[t].astype(np.float32)) for t in range(w.shape[0])])
  np.testing.assert_array_equal(cen.view(np.uint32), r.read("centroid").view(np.uint32))
  # Against the lab's own `W.float().mean(0)` (a different summation order): ulps apart.
  np.testing.assert_allclose(cen, w.astype(np.float32).mean(axis=1), rtol=1e-5, atol=1e-7)


def test_last_motion_step_recomputes_from_delta_w_prime(run):
  cfg, _, r = run
  d = r.read("delta_W_prime")
  moved = np.sqrt((d * d).sum(-1)) >= cfg.probes.motion_threshold  # (T, R)
  t = np.arange(1, d.shape[0] + 1)[:, None]
  want = np.where(moved, t, -1).max(0)
  np.testing.assert_array_equal(r.read("last_motion_step"), want)


def test_accounting_replay_is_exact_on_every_step(run):
  r = run[2]
  np.testing.assert_array_equal(r.read("adam_replay_match"), 1.0)
  assert r.read("adam_cosine")[0] > 0.99  # the lab's t=1: 0.999925


def test_step_has_no_callbacks_and_second_chunk_does_not_recompile(tiny_data):
  cfg = tiny_config(tiny_data)
  corpus = corpus_lib.load_corpus(cfg.data, cfg.model.vocab_size)
  dims = probes.Dims(corpus.n_dead, cfg.model.hidden_dim, jnp.bfloat16)
  step = step_lib.make_step(cfg, corpus.tokens, corpus.dead_indices)
  state = initial.init_state(cfg, dims)
  jaxpr = str(jax.make_jaxpr(lambda s: jax.lax.scan(step, s, jnp.arange(1, 3)))(state))
  assert "callback" not in jaxpr
  # The run's own program (runs.program -> step.make_chunk), not a test-only variant.
  dispatch, sharding = runs.program([cfg], corpus.tokens, corpus.dead_indices,
                                    jax.devices()[:1])
  state, _ = dispatch(runs.stacked([state], sharding), 0, 2)
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda name, *a, **k: compiles.append(name) if "backend_compile" in name else None)
  state, _ = dispatch(state, 2, 2)
  jax.block_until_ready(state)
  assert compiles == []


def test_the_chunk_program_is_reused_only_for_equal_inputs(tiny_data):
  cfg = tiny_config(tiny_data)
  corpus = corpus_lib.load_corpus(cfg.data, cfg.model.vocab_size)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("m",))
  make = lambda c=cfg, tokens=corpus.tokens, rows=corpus.dead_indices: step_lib.make_chunk(
      c, tokens, rows, mesh)
  first = make()
  assert make(dataclasses.replace(cfg)) is first  # an equal config is the same program
  assert make(tokens=corpus.tokens.copy()) is first  # arrays by value, not identity
  other_lr = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, learning_rate=3e-3))
  changed_token = corpus.tokens.copy()
  changed_token[0] += 1
  for program in (make(other_lr), make(tokens=changed_token), make(rows=corpus.dead_indices[1:]),
                  step_lib.make_chunk(cfg, corpus.tokens, corpus.dead_indices, mesh, exact=False)):
    assert program is not first


def test_chunk_plan_ends_chunks_on_checkpoints():
  assert loop.chunk_plan(0, 12, 4, (5, 9)) == [(0, 4), (4, 1), (5, 4), (9, 3)]
  assert loop.chunk_plan(5, 12, 100, (5, 9)) == [(5, 4), (9, 3)]


def test_the_loop_hands_freed_heap_back_between_phases_and_chunks(tiny_data, tmp_path,
                                                                   monkeypatch):
  """After the data and init, after the first compile and after every chunk (peak RSS)."""
  from jaxdt.numerics import backend
  calls = []
  monkeypatch.setattr(backend, "release_heap", lambda: calls.append(1))
  cfg = tiny_config(tiny_data, steps=12)  # chunks 4, 1, 4, 3 (checkpoints at 5 and 9)
  loop.train(cfg, str(tmp_path / "run"), progress=False)
  assert len(calls) == 2 + len(loop.chunk_plan(0, 12, 4, (5, 9)))


def test_run_can_start_from_a_lab_style_torch_checkpoint(tiny_data, tmp_path):
  import torch  # a test dependency: missing is a failure, not a skip
  from jaxdt.model import tinylm, torch_io
  cfg = tiny_config(tiny_data, steps=2)
  params = tinylm.init_params(jax.random.key(123), cfg.model)
  sd = {k: torch.from_numpy(np.ascontiguousarray(v)).to(torch.bfloat16)
        for k, v in torch_io.params_to_torch_state_dict(params, cfg.model).items()}
  path = str(tmp_path / "checkpoint_step_00000.pt")
  torch.save({"step": 0, "model_state_dict": sd}, path)
  result = loop.train(dataclasses.replace(cfg, init_checkpoint=path), str(tmp_path / "run"),
                       progress=False)
  r = tensorfile.TrajectoryReader(result.trajectory)
  rows = r.read("dead_indices")
  want = sd["embedding.weight"][torch.from_numpy(rows)].view(torch.int16).numpy().view(np.uint16)
  np.testing.assert_array_equal(r.rows("W", 0, 1)[0], want)


def test_mixed_precision_is_one_flag_with_f32_master_records(tiny_data, tmp_path):
  # The lab's first open question: do dead tokens freeze with f32 master weights?
  cfg = single_trace(tiny_config(tiny_data, steps=6, precision="mixed"))
  r = tensorfile.TrajectoryReader(loop.train(cfg, str(tmp_path), progress=False).trajectory)
  assert r.dtype("W") == np.float32  # the master weights, not bf16 bits
  np.testing.assert_array_equal(r.read("adam_replay_match"), 1.0)
  w = r.read("W")
  d = r.read("delta_W_prime")  # in f32 spacings of W[t-1]
  np.testing.assert_array_equal(
      d, np.asarray(lattice.in_ulps(w[1:] - w[:-1], w[:-1])))


def test_hooks_have_their_own_cadence_and_chunks_end_where_one_is_due():
  seen = []
  hooks = loop.Hooks()
  hooks.add(lambda r, c, t: seen.append(("every chunk", c.end)))
  hooks.add(lambda r, c, t: seen.append(("every 3", c.end, t)), every=3, take=lambda r: "copy")
  hooks.add(lambda r, c, t: seen.append(("at 5", c.end)), at=(5,))
  assert hooks.marks(0, 10) == {3, 5, 6, 9} and hooks.marks(4, 10) == {5, 6, 9}
  plan = loop.chunk_plan(0, 10, 4, hooks.marks(0, 10))
  assert plan == [(0, 3), (3, 2), (5, 1), (6, 3), (9, 1)]
  for s, n in plan:
    chunk = loop.Chunk(s, n, [], [])
    loop._after(None, hooks, chunk, {id(h): h.take(None) for h in hooks.due(s + n) if h.take})
  assert [x for x in seen if x[0] == "every 3"] == [("every 3", 3, "copy"), ("every 3", 6, "copy"),
                                                     ("every 3", 9, "copy")]
  assert [x[1] for x in seen if x[0] == "at 5"] == [5]
  assert len([x for x in seen if x[0] == "every chunk"]) == len(plan)
  hooks.add(lambda r, c, t: seen.append(("never", c.end)), at=())  # no checkpoint steps
  assert not [x for x in seen if x[0] == "never"] and not hooks.hooks[-1].due(5)
  with pytest.raises(ValueError, match="cadence"):
    hooks.add(print, every=0)


def test_metadata_is_assembled_by_one_function_from_typed_parts(run, tiny_data):
  """layout.run_metadata: at the start no progress keys; at the end the run's figures; the
  finished metadata.json is that plus the commit's facts (RunDir.commit)."""
  from jaxdt.training import layout
  cfg, result, _ = run
  meta = metadata.read_metadata(result.run_dir)
  corpus = corpus_lib.load_corpus(cfg.data, cfg.model.vocab_size)
  lay = layout.layout(cfg, corpus)
  parts = layout.MetadataParts(cfg, corpus, lay, {"data_files": corpus.files},
                               tuple(meta["hosts"]))
  start = layout.run_metadata(parts)
  assert "steps_completed" not in start and start["wall_time_s"] is None
  end = layout.run_metadata(parts._replace(progress=layout.Progress(
      30, meta["final_loss"], meta["wall_time_s"], None, meta["global_last_motion"])))
  commit = {"completed", "trajectory_bytes", "trajectory_sha256", "tensor_sha256",
            "init_checkpoint_sha256", "gemm_path"}
  for key in set(meta) - commit - {"date"}:
    assert end[key] == meta[key], key
  assert end["fimbulwinter_duration"] == 30 - meta["global_last_motion"]
  assert "arithmetic_fingerprint" in meta["hosts"][-1] and "arithmetic_fingerprint" not in meta

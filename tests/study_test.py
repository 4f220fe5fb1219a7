"""`run.py --study`: members run, resumed, skipped by checksum, and the tables from summaries."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxdt import study as study_lib
from jaxdt.report import findings as findings_lib
from jaxdt.report import summary as summary_lib
from jaxdt.training import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
M = study_lib.Member


def tiny_study(paths, members=None, steps=12):
  """A study shrunk to the tests' tiny model and data (the sizes of conftest.tiny_config)."""
  members = members or (M("a_s42", "jax", seed=42), M("b_s7", "jax", seed=7))
  sets = ("data.batch_size=4", "data.seq_len=16", "model.vocab_size=256", "model.hidden_dim=32",
          "model.max_seq_len=16", f"data.corpus_path={paths['corpus']}",
          f"data.tokenizer_path={paths['tokenizer']}", f"data.dead_mask_path={paths['mask']}")
  table = study_lib.Table("spread", "Seed spread", (("seeds", tuple(m.name for m in members)),))
  return study_lib.Study("tiny", tuple(members), (table,), steps=steps, checkpoint_every=5,
                         overrides=sets)


@pytest.fixture(scope="module")
def ran(tiny_data, tmp_path_factory):
  root = tmp_path_factory.mktemp("study")
  study = tiny_study(tiny_data)
  said = []
  study_lib.run(study, str(root / "runs"), str(root / "docs"), log=said.append)
  return study, str(root / "runs"), str(root / "docs"), said


def test_each_member_is_summarized_and_the_tables_are_written(ran):
  study, runs_dir, docs, _ = ran
  for m in study.members:
    s = findings_lib.read_member(docs, m.name)
    assert s["declared"] == m.declared() and s["steps"] == 12 and s["seed"] == m.seed
    assert len(s["n_frozen"]) == 12 and s["trajectory_sha256"]
    assert len(s["dwp_l2_mean"]) == 12
    assert s["mean_dwp_l2"] == pytest.approx(sum(s["dwp_l2_mean"]) / 12, rel=1e-4)
    assert os.path.getsize(os.path.join(runs_dir, m.name, "crucible_1_trajectory.safetensors")) < 8192
  tables = open(os.path.join(docs, "tables.md"), encoding="utf-8").read()
  assert "2/2 members in" in tables and "| a_s42 | seeds |" in tables and "seeds (2/2 in)" in tables
  assert os.path.getsize(os.path.join(docs, "spread.png")) > 1000


def test_a_member_summary_is_the_summarize_row(ran, tmp_path):
  study, runs_dir, docs, _ = ran
  got = summary_lib.summarize([os.path.join(runs_dir, "a_s42")], str(tmp_path), echo=lambda s: None)
  row, s = got["runs"][0], findings_lib.read_member(docs, "a_s42")
  for figure in summary_lib.FIGURES:
    assert s[figure] == row[figure], figure


def test_a_second_run_skips_finished_members(ran):
  study, runs_dir, docs, _ = ran
  said = []
  study_lib.run(study, runs_dir, docs, log=said.append)
  assert [l for l in said if l.endswith(")") and ": done" in l] and not any(
      "starting" in l or "resuming" in l for l in said)
  assert "2/2 done" in study_lib.plan(study, runs_dir, docs)


def test_a_member_folder_with_another_config_is_refused(ran, tiny_data, tmp_path):
  study, runs_dir, docs, _ = ran
  other = tiny_study(tiny_data, members=(M("a_s42", "jax", seed=42, learning_rate=3e-4),))
  with pytest.raises(study_lib.StudyError, match="a_s42: .* holds another config "
                     r"\(optim.learning_rate: the folder has 0.001, the study says 0.0003\)"):
    study_lib.run(other, runs_dir, str(tmp_path / "docs"), log=lambda s: None)


def test_a_checksum_that_does_not_match_is_refused(ran, tmp_path):
  study, runs_dir, docs, _ = ran
  s = findings_lib.read_member(docs, "b_s7")
  fake = str(tmp_path / "docs")
  findings_lib.write_member(fake, {**s, "trajectory_sha256": "0" * 64})
  with pytest.raises(findings_lib.FindingsError, match="b_s7: .* is not the one its summary"):
    study_lib.run(study, runs_dir, fake, only=("b_s7",), log=lambda s: None)


def test_a_summary_stands_when_its_folder_is_gone(ran, tmp_path):
  study, runs_dir, docs, _ = ran
  said = []
  study_lib.run(study, str(tmp_path / "elsewhere"), docs, log=said.append)
  assert sum(": done" in l for l in said) == 2


def test_an_unfinished_member_resumes_from_its_checkpoint(tiny_data, tmp_path):
  study = tiny_study(tiny_data, members=(M("a_s42", "jax", seed=42),))
  cfg = study_lib.jax_config(study, study.members[0])
  loop.train(cfg, str(tmp_path / "runs" / "a_s42"), progress=False, log=lambda s: None,
             stop_after=7)
  st = study_lib.status(study, str(tmp_path / "runs"), str(tmp_path / "docs"), study.members[0])
  assert (st.state, st.step) == ("partial", 5)
  said = []
  study_lib.run(study, str(tmp_path / "runs"), str(tmp_path / "docs"), log=said.append)
  assert "a_s42: resuming from step 5" in said
  assert findings_lib.read_member(str(tmp_path / "docs"), "a_s42")["steps"] == 12


def test_the_command_line_refuses_an_unknown_study():
  done = subprocess.run([sys.executable, "run.py", "--study=nope"], cwd=ROOT,
                        capture_output=True, text=True, check=False)
  assert done.returncode == 2 and done.stderr.strip().splitlines() == [
      "error: unknown study 'nope'; use --study=one of ['findings']"]


def test_the_findings_study_declares_its_members():
  study = study_lib.load("findings")
  names = [m.name for m in study.members]
  assert len(names) == len(set(names)) == 22
  for t in study.tables:
    for _, members in t.groups:
      assert set(members) <= set(names), t.name
  cfg = study_lib.jax_config(study, study.member("jax_mixed_s1"))
  assert (cfg.steps, cfg.seed, cfg.precision, cfg.probes.names) == (2000, 1, "mixed", ("freeze",))
  assert cfg.store.checkpoint_steps == (100, 250, 500, 750, 1000, 1250, 1500, 1750, 2000)
  assert study_lib.jax_config(study, study.member("jax_kahan_s1")).precision == "bf16_kahan"
  # a member's own config assignments reach its config and its command, and its declaration
  ln = study.member("jax_lncpu_s42")
  assert study_lib.jax_config(study, ln).model.layernorm_backward == "torch_cpu"
  argv = study_lib.command(study, ln, "/tmp/x")
  assert argv[argv.index("model.layernorm_backward=torch_cpu") - 1] == "--set"
  assert ln.declared() == json.loads(json.dumps(ln.declared()))  # as a summary gives it back
  assert ln.declared()["sets"] == ["model.layernorm_backward=torch_cpu"]
  # members without sets declare what they declared before the field existed
  assert "sets" not in study.member("jax_bf16_s42").declared()
  with pytest.raises(ValueError, match="a torch member takes none"):
    study_lib.Member("t", "torch", sets=("model.layernorm_backward=torch_cpu",))


def test_a_study_sweep_gives_each_member_its_solo_bytes(ran, tiny_data, tmp_path):
  """--study_sweep: fresh jaxdt members as one exact sweep; summaries (and so the trajectories'
  SHA-256) equal the members run one at a time."""
  study, _, docs, _ = ran
  said = []
  study_lib.run(study, str(tmp_path / "runs"), str(tmp_path / "docs"), sweep=True,
                log=said.append)
  assert "a_s42, b_s7: starting as one exact sweep" in said
  for m in study.members:
    solo = findings_lib.read_member(docs, m.name)
    swept = findings_lib.read_member(str(tmp_path / "docs"), m.name)
    assert swept["trajectory_sha256"] == solo["trajectory_sha256"], m.name


def test_torch_members_and_a_twin(tiny_data, tmp_path):
  """A torch member (the lab's loop, native GEMMs) and the f32-route twin of a jaxdt member
  run through torchref.peer, write the freeze record and are summarized."""
  members = (M("j", "jax", seed=42), M("t", "torch", seed=3, gemm="native"),
             M("tw", "torch", seed=42, gemm="f32", twin_of="j"))
  study = tiny_study(tiny_data, members=members, steps=8)
  said = []
  study_lib.run(study, str(tmp_path / "runs"), str(tmp_path / "docs"), log=said.append)
  for m in members:
    s = findings_lib.read_member(str(tmp_path / "docs"), m.name)
    assert s["framework"] == m.framework and s["steps"] == 8, m.name
  tw = findings_lib.read_member(str(tmp_path / "docs"), "tw")
  assert tw["host"]["torch_gemm"] == "f32" and "--init_from=" in tw["command"]
  assert "3/3 members in" in open(tmp_path / "docs" / "tables.md", encoding="utf-8").read()
  said.clear()
  study_lib.run(study, str(tmp_path / "runs"), str(tmp_path / "docs"), log=said.append)
  assert sum(": done" in l for l in said) == 3


def test_a_twin_waits_for_its_source(tiny_data, tmp_path):
  members = (M("j", "jax", seed=42), M("tw", "torch", seed=42, gemm="f32", twin_of="j"))
  study = tiny_study(tiny_data, members=members, steps=8)
  with pytest.raises(study_lib.StudyError, match="twin of j, which has not finished"):
    study_lib.run(study, str(tmp_path / "runs"), str(tmp_path / "docs"), only=("tw",),
                  log=lambda s: None)


def test_the_tables_are_generated_into_the_document_between_its_markers(ran, tmp_path):
  study, _, docs, _ = ran
  doc = tmp_path / "docs.md"
  doc.write_text(f"# Findings\nintro\n{findings_lib.BEGIN}\nold\n{findings_lib.END}\nafter\n",
                 encoding="utf-8")
  import shutil
  shutil.copytree(docs, tmp_path / "docs")
  findings_lib.write_tables(study, str(tmp_path / "docs"), log=lambda s: None)
  text = doc.read_text(encoding="utf-8")
  assert text.startswith("# Findings\nintro\n") and text.endswith(f"{findings_lib.END}\nafter\n")
  assert "old" not in text and "| a_s42 | seeds |" in text and "](docs/spread.png)" in text


def test_a_member_that_diverged_keeps_its_row(tiny_data, tmp_path):
  """A diverged member is summarized over the steps before it and shown in its table row."""
  study = tiny_study(tiny_data, members=(M("hot", "jax", seed=42, learning_rate=1e4),), steps=12)
  study_lib.run(study, str(tmp_path / "runs"), str(tmp_path / "docs"), log=lambda s: None)
  s = findings_lib.read_member(str(tmp_path / "docs"), "hot")
  assert s["diverged_at_step"] is not None and s["steps"] == s["diverged_at_step"] - 1
  tables = open(tmp_path / "docs" / "tables.md", encoding="utf-8").read()
  assert f"(diverged at {s['diverged_at_step']})" in tables and "| hot | seeds |" in tables


def test_the_detector_is_scored_on_members_and_added_to_done_ones(ran, tmp_path):
  """A study with detect steps scores each jaxdt member (checkpoints kept at those steps, step
  0 from the init); a member done before the study scored it gets its scores from its folder."""
  study, runs_dir, docs, _ = ran
  scored = dataclasses.replace(study, detect_steps=(0, 6, 12))
  assert scored.marks() == (5, 6, 10, 12)
  copy = str(tmp_path / "docs")
  os.makedirs(copy)
  for m in study.members:
    with open(findings_lib.member_path(copy, m.name), "w", encoding="utf-8") as f:
      json.dump(findings_lib.read_member(docs, m.name), f)
  said = []
  study_lib.run(scored, runs_dir, copy, log=said.append)  # done: no training, scores added
  assert not any("starting" in l or "resuming" in l for l in said)
  s = findings_lib.read_member(copy, "a_s42")
  assert [(d["step"], d["source"]) for d in s["detect"]] == [
      (0, "init"), (6, "replayed 1 step from checkpoint 5"), (12, "replayed 2 steps from "
                                                                   "checkpoint 10")]
  assert s["detect_recall_last"] == s["detect"][-1]["recall"] and abs(s["state_bytes_per_param"] - 6) < 1e-3
  # bf16: the parameters and both moments, 2 bytes each (and Adam's step count)
  fresh = str(tmp_path / "runs")
  study_lib.run(scored, fresh, str(tmp_path / "docs2"), only=("b_s7",), log=said.append)
  s = findings_lib.read_member(str(tmp_path / "docs2"), "b_s7")
  assert [d["source"] for d in s["detect"]] == ["init", "checkpoint", "checkpoint"]
  _check_copy_motion(s, os.path.join(fresh, "b_s7"))
  _check_copy_motion(findings_lib.read_member(copy, "a_s42"), os.path.join(runs_dir, "a_s42"))


def _check_copy_motion(s, folder):
  """The summary's bf16 copy motion over the last checkpoint interval (10..12), recounted
  with plain numpy from the two checkpointed states' uint16 bits."""
  from jaxdt.io import tensorfile  # pylint: disable=g-import-not-at-top
  from jaxdt.training import replay  # pylint: disable=g-import-not-at-top
  assert s["copy_window"] == [10, 12]
  with tensorfile.TrajectoryReader(os.path.join(folder, "crucible_1_trajectory.safetensors")) as r:
    dead = np.asarray(r.read("dead_mask"), bool)
  a, b = replay.states_at(folder, (10, 12), log=lambda line: None)
  bits = lambda st: np.asarray(st.state.params["embedding"])[dead].view(np.uint16)
  changed = bits(a) != bits(b)  # bf16 run: the stored W is its own copy (no −0 here)
  assert s["copy_rows_moved"] == changed.any(axis=1).mean() > 0
  assert s["copy_elements_moved"] == changed.mean()


def test_a_summary_from_older_code_gets_its_per_step_motion_from_the_folder(ran, tmp_path):
  """A done member whose summary lacks the per-step mean ‖ΔW′‖₂ gets it from its folder,
  with no training and nothing else changed."""
  study, runs_dir, docs, _ = ran
  copy = str(tmp_path / "docs")
  os.makedirs(copy)
  full = {m.name: findings_lib.read_member(docs, m.name) for m in study.members}
  for name, s in full.items():
    with open(findings_lib.member_path(copy, name), "w", encoding="utf-8") as f:
      json.dump({k: v for k, v in s.items() if k != "dwp_l2_mean"}, f)
  said = []
  study_lib.run(study, runs_dir, copy, log=said.append)
  assert not any("starting" in l or "resuming" in l for l in said)
  assert sum("per-step mean ‖ΔW′‖₂ added" in l for l in said) == 2, said
  for name, s in full.items():
    assert findings_lib.read_member(copy, name) == s
  said.clear()
  study_lib.run(study, runs_dir, copy, log=said.append)  # complete now: nothing added
  assert not any("added" in l for l in said)


def test_the_late_motion_figure_is_the_mean_after_its_step():
  series = [1000.0] * findings_lib.LATE_FROM + [0.5, None, 1.5]
  s = {"dwp_l2_mean": series}
  assert findings_lib.figure(s, "mean_dwp_l2_late") == 1.0
  assert findings_lib.figure({"dwp_l2_mean": series[:findings_lib.LATE_FROM]},
                             "mean_dwp_l2_late") is None
  assert findings_lib.figure({}, "mean_dwp_l2_late") is None


def test_the_tail_figure_averages_the_last_steps_not_the_last_one():
  tail = findings_lib.TAIL_STEPS
  # 100 rows: all frozen before the tail; in it, 90 frozen on every step but the last (100).
  n = [100] * 50 + [90] * (tail - 1) + [100]
  s = {"n_frozen": n, "rows": 100}
  assert findings_lib.figure(s, "moving_last") == 0.0
  assert findings_lib.figure(s, "moving_tail") == pytest.approx(0.1 * (tail - 1) / tail)
  assert findings_lib.figure({"rows": 100}, "moving_tail") is None
  note = findings_lib._column_notes(("frozen_50", "moving_tail"), [])  # pylint: disable=protected-access
  assert f"last {tail} steps" in note


def test_motion_in_bf16_cells_scales_an_f32_lattice_exactly():
  """Under mixed ΔW′ is in f32 cells, 2^-16 of the bf16 cell at the same value; under the
  bf16 policies it is already in bf16 cells."""
  series = [3.0] * findings_lib.LATE_FROM + [65536.0, 131072.0]
  for precision, want in (("mixed", 1.5), ("fp32", 1.5), ("bf16", 98304.0), ("bf16_sr", 98304.0)):
    s = {"precision": precision, "dwp_l2_mean": series}
    assert findings_lib.figure(s, "mean_dwp_l2_late_bf16") == want, precision
  assert findings_lib.figure({"precision": "mixed", "mean_dwp_l2": 2.0 ** 20},
                             "mean_dwp_l2_bf16") == 16.0
  assert findings_lib.figure({"precision": "mixed"}, "mean_dwp_l2_bf16") is None


def test_a_table_with_copy_motion_says_what_it_measures():
  table = study_lib.Table("t", "T", (("p", ("x", "y")),),
                          figures=("copy_rows_moved", "mean_dwp_l2_late_bf16"))
  rows = {"x": {"steps": 2000, "copy_window": [1750, 2000], "copy_rows_moved": 0.1612},
          "y": {"steps": 2000, "copy_window": [1750, 2000], "copy_rows_moved": 1.0}}
  text = findings_lib.table_markdown(table, rows)
  assert "| x | p | 0.161 |" in text and "| y | p | 1.000 |" in text
  assert "differ between steps 1,750-2,000" in text and "divided by 2^16" in text
  assert "bf16 rows moved" not in findings_lib.table_markdown(
      study_lib.Table("u", "U", (("p", ("x",)),), figures=("final_loss",)), rows)


def test_a_table_in_bf16_cells_plots_the_motion_beside_the_frozen_fraction(ran):
  """Its PNG gains a second panel (the per-step motion in bf16 cells): twice as wide."""
  _, _, docs, _ = ran
  got = {n: findings_lib.read_member(docs, n) for n in ("a_s42", "b_s7")}
  width = lambda png: int.from_bytes(png[16:20], "big")  # the PNG's IHDR width
  plain = study_lib.Table("t", "T", (("seeds", ("a_s42", "b_s7")),), figures=("frozen_50",))
  cells = dataclasses.replace(plain, figures=("frozen_50", "mean_dwp_l2_late_bf16"))
  assert width(findings_lib._plot(cells, got)) > 1.5 * width(findings_lib._plot(plain, got))


def test_a_table_shows_the_figures_it_names(ran, tmp_path):
  study, _, docs, _ = ran
  table = study_lib.Table("t", "T", (("seeds", ("a_s42", "b_s7")),),
                          figures=("frozen_50", "moving_last", "steps_per_s"))
  text = findings_lib.table_markdown(table, {n: findings_lib.read_member(docs, n)
                                             for n in ("a_s42", "b_s7")})
  assert "| member | group | 50% | moving at end | steps/s |" in text
  s = findings_lib.read_member(docs, "a_s42")
  assert findings_lib.figure(s, "steps_per_s") == s["steps"] / s["wall_time_s"]


def test_a_reference_range_counts_the_members_inside_it():
  """`Table.reference`: per figure, the reference group's min–max and each other group's
  members inside it; a milestone not reached counts as later than every step."""
  def s(name, f50, f100, loss):
    return {"member": name, "steps": 100, "frozen_50": f50, "frozen_100": f100,
            "final_loss": loss}
  summaries = {"t1": s("t1", 40, 90, 4.0), "t2": s("t2", 50, None, 4.5),
               "j1": s("j1", 40, 95, 3.9), "j2": s("j2", 51, None, 4.2),
               "j3": s("j3", 45, 60, 4.5)}
  table = study_lib.Table("t", "T", (("jax", ("j1", "j2", "j3", "j4")), ("torch", ("t1", "t2")),
                                     ("later", ("x1",))),
                          figures=("frozen_50", "frozen_100", "final_loss"), reference="torch")
  text = findings_lib.range_markdown(table, summaries)
  assert "| torch range | 40 – 50 | 90 – > 100 | 4.0000 – 4.5000 |" in text
  assert ("| jax | 2/3 (51 above) | 2/3 (60 below) | 2/3 (3.9000 below) |" in text), text
  assert "| later | not yet | not yet | not yet |" in text and "(2/2 in)" in text
  assert "= 0.33" in text  # (n-1)/(n+1) for n=2
  # the rank-sum row: 50% 40,51,45 against 40,50 (midranks 1.5+5+3 = 9.5 against a mean
  # of 9: every one of the 10 splits lies at least that far, p = 1); frozen_100 95, inf, 60
  # against 90, inf (ranks 3, 4.5, 1 against 2, 4.5: 8.5 against 9, again p = 1); 3
  # against 2 allow p >= 2/10
  assert "| jax: rank-sum p | 1.000 (min 0.200) | 1.000 (min 0.200) | " in text, text
  assert "| later: rank-sum p |" not in text
  assert "range of torch" in findings_lib.table_markdown(table, summaries)
  none_in = findings_lib.range_markdown(table, {"j1": summaries["j1"]})
  assert "Not yet: none of its members is in." in none_in


def test_torch_members_on_a_gpu_say_so_in_their_command_identity_and_row():
  """--study_torch_device=cuda: torch members run `torchref.peer --device=cuda`; a folder run
  on the CPU is another run (refused in one line); a GPU row names its device."""
  study = study_lib.load("findings")
  gpu = dataclasses.replace(study, torch_device="cuda")
  t = study.member("torch_s1")
  assert "--device=cuda" in study_lib.command(gpu, t, "/tmp/x")
  assert not any(a.startswith("--device") for a in study_lib.command(study, t, "/tmp/x"))
  meta = {"framework": "torch", "config": {"seed": 1, "steps": 2000,
                                           "probes": {"names": ["freeze"]}},
          "torch_gemm_requested": "auto", "device": "cpu"}
  study_lib._check_identity(study, t, "/f", meta)  # pylint: disable=protected-access
  with pytest.raises(study_lib.StudyError,
                     match="device: the folder has 'cpu', the study says 'cuda'"):
    study_lib._check_identity(gpu, t, "/f", meta)  # pylint: disable=protected-access
  row = {"host": {"cpu_model": "AMD EPYC", "device": "cuda", "torch_device": "cuda (NVIDIA H100)",
                  "torch_gemm": "native"}, "wall_time_s": 120}
  assert findings_lib._host(row) == "cuda (NVIDIA H100); native; 2 min"  # pylint: disable=protected-access
  row = {"host": {"cpu_model": "AMD EPYC", "device": "gpu", "device_kind": "NVIDIA H100",
                  "gemm_path": "bfloat16 operands (gpu)"}, "wall_time_s": 60}
  assert findings_lib._host(row) == "NVIDIA H100 (gpu); bfloat16 operands; 1 min"  # pylint: disable=protected-access

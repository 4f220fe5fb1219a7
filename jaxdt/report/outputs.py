"""Entry points: analyse or compare runs, print, write summary.json, compare.json and PNGs.

`analyze(path)` runs `jaxdt.analysis.metrics.measure` (one streaming pass),
prints the lab-style blocks (the lab's FIMBULWINTER CHECK and STILLNESS
PERIOD ANALYSIS verbatim, then the other analyses in the same style), and
writes `summary.json` and five PNGs next to the file or into `analysis_dir`.
`compare(a, b)` prints the cross-run (cross-backend) comparison of
`jaxdt.analysis.compare.compare`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Optional, Sequence


from jaxdt.analysis import compare as compare_lib
from jaxdt.analysis import divergence as divergence_lib
from jaxdt.analysis import metrics
from jaxdt.analysis import trajectory
from jaxdt.io import disk
from jaxdt.io import metadata
from jaxdt.report import plots as plots_lib
from jaxdt.report import text


SUMMARY_FILE = "summary.json"
COMPARE_FILE = "compare.json"
ANALYSIS_KEYS = ("file", "layout", "steps", "outputs")  # an --analyze summary.json has them


def write_json(path: str, content: dict) -> str:
  """Writes strict JSON (NaN and inf become null) atomically: tmp file, fsync, rename, so
  an interrupted analysis leaves the old file or the new one, never a torn one."""
  disk.atomic_write_text(path, json.dumps(metadata.json_ready(content), indent=2,
                                          allow_nan=False) + "\n")
  return path


def write_summary(content: dict, out_dir: str) -> str:
  """Writes `out_dir/summary.json` (strict JSON: NaN and inf become null), atomically."""
  os.makedirs(out_dir, exist_ok=True)
  return write_json(os.path.join(out_dir, SUMMARY_FILE), content)


def check_outputs(out_dir: str, names: Sequence[str], record: str, keys: Sequence[str],
                  flag: str) -> None:
  """Refuses, before anything is read or written, a folder where one of `names` exists and
  jaxdt did not write it: jaxdt wrote them all when `record` (one of them) is a JSON object
  with `keys`, e.g. the summary.json of an earlier --analyze; else they are the user's.

  Raises:
    StoreError: one line naming the file and what to do.
  """
  present = [n for n in names if os.path.lexists(os.path.join(out_dir, n))]
  if not present:
    return
  try:
    prior = metadata.read_json_object(os.path.join(out_dir, record))
  except disk.StoreError:
    prior = None
  odd = [n for n in present if not os.path.isfile(os.path.join(out_dir, n))
         or os.path.islink(os.path.join(out_dir, n))]
  if odd or not (isinstance(prior, dict) and all(k in prior for k in keys)):
    name = (odd or present)[0]
    raise disk.StoreError(f"{os.path.join(out_dir, name)} exists and jaxdt did not write it; "
                          f"pass another {flag} (or move the file away): jaxdt never "
                          "overwrites files it did not write")


def output_dir(trajectory: str, analysis_dir: Optional[str]) -> str:
  """Where summary.json and the PNGs go: analysis_dir, else the file's folder."""
  return analysis_dir or os.path.dirname(os.path.abspath(trajectory))


def analyze(path: str, analysis_dir: Optional[str] = None, *, block_steps: Optional[int] = None,
            plots: bool = True, header: bool = True,
            echo: Callable[[str], None] = print,
            lab_validation: Optional[str] = None) -> metrics.Summary:
  """Analyses a run folder or trajectory file: prints, writes summary.json and PNGs.

  Args:
    path: a run folder or .safetensors file (ours or the lab's layout).
    analysis_dir: where to write (default: beside the file).
    block_steps: steps per streamed block (default: about 64 MB of work).
    plots: write the PNGs.
    header: print the ANALYSIS header block.
    echo: where printed text goes.
    lab_validation: the lab's Thimble 1 accounting cell output
      (`lab_accounting.format_accounting`), printed in place of the per-step
      sample lines so the same figures are not printed twice.

  Returns:
    The Summary (summary.json is its `to_json()` plus "outputs": the files written).

  Raises:
    metrics.AnalysisError: PATH is not an analysable trajectory.
  """
  out = output_dir(trajectory.resolve_path(path), analysis_dir)
  check_outputs(out, (SUMMARY_FILE, *plots_lib.PLOT_FILES.values()), SUMMARY_FILE,
                ANALYSIS_KEYS, "--analysis_dir")
  summary, series = metrics.measure(path, block_steps=block_steps)
  if lab_validation and summary.accounting is not None:
    summary = dataclasses.replace(summary, accounting=dataclasses.replace(
        summary.accounting, lab_validation=lab_validation))
  written, skipped = plots_lib.write_plots(series, summary, out) if plots else ([], [])
  summary = dataclasses.replace(summary, skipped=summary.skipped + tuple(
      metrics.Skipped(f"plot {n}", why) for n, why in skipped))
  outputs = {"summary": os.path.join(out, SUMMARY_FILE), "plots": written}
  write_summary({**summary.to_json(), "outputs": outputs}, out)
  echo(text.format_summary(summary, header=header))
  echo(f"\nWrote {outputs['summary']} and {len(written)} plots to {out}")
  return summary


def compare(path_a: str, path_b: str, analysis_dir: Optional[str] = None, *,
            block_steps: Optional[int] = None, echo: Callable[[str], None] = print) -> dict:
  """Compares two runs, prints the table, the per-step divergence and the verdict; writes
  compare.json (and divergence.png) into analysis_dir.

  Raises:
    metrics.AnalysisError: either PATH is not an analysable trajectory.
  """
  if analysis_dir:
    check_outputs(analysis_dir, (COMPARE_FILE, plots_lib.DIVERGENCE_FILE), COMPARE_FILE,
                  ("a", "b", "keys", "identical"), "--analysis_dir")
  with trajectory.malformed(f"{path_a} or {path_b}"):
    result = compare_lib.compare(path_a, path_b, block_steps=block_steps)
    try:
      div = divergence_lib.divergence(path_a, path_b, block_steps=block_steps)
    except metrics.AnalysisError as e:  # no W, or other rows: the table still stands
      div, result["divergence_skipped"] = None, str(e)
  result["divergence"] = None if div is None else div.to_json()
  echo(text.format_compare(result))
  if analysis_dir:
    os.makedirs(analysis_dir, exist_ok=True)
    write_json(os.path.join(analysis_dir, COMPARE_FILE), result)
    if div is not None:
      plots_lib.plot_divergence(div, os.path.join(analysis_dir, plots_lib.DIVERGENCE_FILE))
  return result

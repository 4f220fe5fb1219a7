"""Entry points: analyse or compare runs, print, write summary.json, compare.json and PNGs.

`analyze(path)` runs `jaxdt.analysis.metrics.analyze` (one streaming pass),
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
from typing import Callable, Optional


from jaxdt.analysis import compare as compare_lib
from jaxdt.analysis import divergence as divergence_lib
from jaxdt.analysis import metrics
from jaxdt.io import metadata
from jaxdt.report import plots as plots_lib
from jaxdt.report import text


SUMMARY_FILE = "summary.json"


def write_summary(content: dict, out_dir: str) -> str:
  """Writes `out_dir/summary.json` (strict JSON: NaN and inf become null)."""
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, SUMMARY_FILE)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(metadata.json_ready(content), f, indent=2, allow_nan=False)
    f.write("\n")
  return path


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
  summary, series = metrics.analyze(path, block_steps=block_steps)
  if lab_validation and summary.accounting is not None:
    summary = dataclasses.replace(summary, accounting=dataclasses.replace(
        summary.accounting, lab_validation=lab_validation))
  out = output_dir(summary.file, analysis_dir)
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
  result = compare_lib.compare(path_a, path_b, block_steps=block_steps)
  try:
    div = divergence_lib.divergence(path_a, path_b, block_steps=block_steps)
  except metrics.AnalysisError as e:  # no W, or other rows: the table still stands
    div, result["divergence_skipped"] = None, str(e)
  result["divergence"] = None if div is None else div.to_json()
  echo(text.format_compare(result))
  if analysis_dir:
    os.makedirs(analysis_dir, exist_ok=True)
    with open(os.path.join(analysis_dir, "compare.json"), "w", encoding="utf-8") as f:
      json.dump(metadata.json_ready(result), f, indent=2, allow_nan=False)
      f.write("\n")
    if div is not None:
      plots_lib.plot_divergence(div, os.path.join(analysis_dir, plots_lib.DIVERGENCE_FILE))
  return result

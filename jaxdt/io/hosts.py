"""Which host did a run's arithmetic: the resume check that never mixes arithmetic.

A run's metadata.json records the host it ran on (`host`: CPU model and
arithmetic features, GEMM path, `arithmetic_fingerprint`) and, once a resume
has continued it on another host, `hosts`: one entry per stretch of steps.
`check_resume_host` compares the run's last host with this one:

  * equal fingerprints: the same arithmetic; the resume goes on.
  * other fingerprints: refused in one line naming both CPUs, unless the caller
    allows a host change (`--allow_host_change`), which is then recorded.
  * no recorded fingerprint (a run begun by an older jaxdt): the same CPU
    class (model and features) resumes with a one-line note; another class,
    or no recorded CPU at all, is refused unless allowed.

The host records are plain dicts made by the training side; this module only
compares them.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

from jaxdt.io import disk

HOST_KEYS = ("cpu_model", "cpu_features", "gemm_path", "arithmetic_fingerprint")


def host_of(metadata: Mapping) -> dict:
  """The host a run last ran on, from its metadata.json (older runs: the top-level keys)."""
  hosts = metadata.get("hosts")
  if isinstance(hosts, list) and hosts and isinstance(hosts[-1], dict):
    return dict(hosts[-1])
  return {k: metadata.get(k) for k in HOST_KEYS}


def describe(host: Mapping) -> str:
  """"AMD EPYC [avx avx2 fma] (fingerprint 1a2b3c4d)" for messages."""
  feats = host.get("cpu_features")
  fp = host.get("arithmetic_fingerprint")
  return (f"{host.get('cpu_model') or 'an unrecorded CPU'}"
          + (f" [{' '.join(feats)}]" if feats else "")
          + (f" (fingerprint {fp[:8]})" if fp else ""))


def same_class(a: Mapping, b: Mapping) -> bool:
  """Same CPU class: model and arithmetic features both recorded and equal."""
  return (a.get("cpu_model") is not None and a.get("cpu_features") is not None
          and a.get("cpu_model") == b.get("cpu_model")
          and list(a.get("cpu_features")) == list(b.get("cpu_features")))


def check_resume_host(path: str, metadata: Mapping, host: Mapping, allow_change: bool,
                      log: Callable[[str], None]) -> bool:
  """Checks that a resume of the run in `path` may continue on `host`.

  Returns:
    True when it continues on another host (allowed by `allow_change`).

  Raises:
    StoreError: the run's arithmetic differs from this host's and a change is
      not allowed (one line naming both CPUs and the fix).
  """
  theirs = host_of(metadata)
  fp = theirs.get("arithmetic_fingerprint")
  if fp is not None and fp == host.get("arithmetic_fingerprint"):
    return False
  if fp is None and same_class(theirs, host):
    log(f"{path}: no arithmetic fingerprint recorded (an older jaxdt run); the same CPU "
        f"class ({describe(host)}): resuming")
    return False
  if allow_change:
    log(f"{path}: continuing on another host: it ran on {describe(theirs)}, this host is "
        f"{describe(host)}; metadata records the step where the host changed")
    return True
  why = ("its arithmetic fingerprint differs" if fp is not None else
         "it records no fingerprint and another CPU class" if theirs.get("cpu_model") else
         "it records no CPU")
  raise disk.StoreError(
      f"cannot resume {path} here: it ran on {describe(theirs)}, this host is "
      f"{describe(host)}, and {why} (other arithmetic, other bits); resume it on its own CPU "
      "class, or pass --allow_host_change to continue anyway (recorded in metadata)")


def hosts_after_resume(metadata: Optional[Mapping], host: Mapping, start: int) -> list:
  """The `hosts` list of a run continuing after step `start` on `host`: the stretches
  before `start` as recorded, then this host's (a new entry only where the host changes)."""
  entry = {"from_step": start, **host}
  if not metadata or start == 0:
    return [{**entry, "from_step": 0}]
  hosts = metadata.get("hosts")
  if not isinstance(hosts, list) or not hosts:
    hosts = [{"from_step": 0, **host_of(metadata)}]
  kept = [h for h in hosts if int(h.get("from_step", 0)) < start] or hosts[:1]
  last = kept[-1]
  same = (last.get("arithmetic_fingerprint") == host.get("arithmetic_fingerprint")
          if last.get("arithmetic_fingerprint") else same_class(last, host))
  return kept if same else kept + [entry]


def stretches(metadata: Mapping, total_steps: int) -> Optional[str]:
  """"steps 0–1000 on A, 1000–2000 on B" for a run that changed host; None if it did not."""
  hosts = metadata.get("hosts")
  if not isinstance(hosts, list) or len(hosts) < 2:
    return None
  ends = [int(h.get("from_step", 0)) for h in hosts[1:]] + [total_steps]
  return ", ".join(f"steps {int(h.get('from_step', 0))}–{e} on {describe(h)}"
                   for h, e in zip(hosts, ends))

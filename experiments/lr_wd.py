"""lr x wd: does the learning rate or the weight decay control freeze timing?

Crucible 1's training and probes (5,000 steps, every dead row's W, ΔW′, last
motion, the in-scan Adam accounting) over lr 1e-3 / 3e-4 x wd 0 / 0.1: four
members, each a complete Crucible 1 run folder under the sweep's output_dir
(two compiled programs: wd = 0 omits torch's decay op). The summary compares
their global last motion, Fimbulwinter duration and frozen-fraction milestones.

    python run.py --experiment=lr_wd
"""

from experiments import crucible1

from jaxdt.config import ExperimentConfig


def config() -> ExperimentConfig:
  return crucible1.swept("lr_wd", "learning_rate=1e-3,3e-4;weight_decay=0,0.1",
                         "Crucible 1, lr x wd",
                         "Sweep: lr 1e-3/3e-4 x wd 0/0.1.")

"""Judges the eval tests load by module path (``--judge eval_judges:SlowLabels``)."""

from __future__ import annotations

import time

from latentlens.eval import LabelsJudge


class SlowLabels(LabelsJudge):
    """The labels judge, slowed so a test can kill a run part way."""

    name = "slow-labels"

    def judge(self, task):
        time.sleep(0.15)
        return super().judge(task)

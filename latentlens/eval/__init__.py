"""Measure how interpretable a VLM's visual tokens are, per method and layer (`llens eval`).

``sampling`` picks images and patches, ``judges`` decide whether a method's
words describe a patch, ``runner`` records every verdict in the store as a
resumable run, and ``summary`` turns verdicts into % interpretable with a
95% interval, a plot and a CSV.
"""

from latentlens.eval.judges import (
    JUDGES,
    Judge,
    JudgeError,
    Judgement,
    JudgeTask,
    LabelsJudge,
    OpenAICompatibleJudge,
    make_judge,
    register,
)
from latentlens.eval.runner import EvalOptions, EvalResult, run_eval
from latentlens.eval.summary import (
    SummaryRow,
    summarize,
    wilson,
    write_csv,
    write_jsonl,
    write_plot,
)

__all__ = [
    "JUDGES", "EvalOptions", "EvalResult", "Judge", "JudgeError", "JudgeTask", "Judgement", "LabelsJudge",
    "OpenAICompatibleJudge", "SummaryRow", "make_judge", "register", "run_eval", "summarize", "wilson",
    "write_csv", "write_jsonl", "write_plot",
]

"""The one evaluation pipeline of every command (``run``, ``experiment``, and
any later evaluation), streamed and split over the workers:

  plan.py     what an evaluation runs (``EvaluationStage``, a value) and how
              its queries and splits are split over the workers
  suite.py    the attacks of the registry on every batch of queries
  results.py  one results format: every attack, the worst case, curves
  checks.py   the checks that the numbers can be trusted
  stage.py    one model's evaluation, in this process or on a Ray worker
  report.py   the one report writer: the run view and the experiment view
"""

from saat_dist.evaluation.checks import CHECKS, run_checks
from saat_dist.evaluation.plan import RESULTS, RUN_RESULTS, EvaluationStage, random_map
from saat_dist.evaluation.stage import RETRIEVAL_IMAGES, evaluate, evaluate_stage
from saat_dist.evaluation.suite import SINGLE_RUN

__all__ = ["CHECKS", "RESULTS", "RETRIEVAL_IMAGES", "RUN_RESULTS", "SINGLE_RUN", "EvaluationStage", "evaluate",
           "evaluate_stage", "random_map", "run_checks"]

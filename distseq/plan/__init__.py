"""The planner: predicted step time of every feasible parallel layout of a run on a cluster (``distseq plan``).

``profiles`` (devices and links, ``profiles.json``), ``cost`` (one layout's predicted step from the dry-run plan's
FLOPs and exact bytes), ``search`` (the candidates, ranked). An uncalibrated model: its assumptions are in
``docs/planning.md``.
"""

from distseq.plan.cost import Prediction, predict_step
from distseq.plan.profiles import ClusterProfile, load_profile, profile_names
from distseq.plan.search import Candidate, rank_layouts

__all__ = ["Candidate", "ClusterProfile", "Prediction", "load_profile", "predict_step", "profile_names", "rank_layouts"]

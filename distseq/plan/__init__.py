"""The planner: predicted step time of every feasible parallel layout of a run on a cluster (``distseq plan``).

``profiles`` (devices and links, ``profiles.json``; ``measure``: a profile of the machine at hand), ``calls`` (the
kernel calls each softmax strategy's block plans make on each rank), ``cost`` (one layout's predicted step from
the dry-run plan's FLOPs and exact bytes), ``search`` (the candidates, ranked), ``auto`` and ``batch`` (the choices
made at launch and per batch), ``schedule`` and ``published`` (the step-level model that reproduces published
results). Its assumptions and how it compares with measurements: ``docs/planning.md``.
"""

from distseq.plan.cost import Prediction, predict_step
from distseq.plan.profiles import ClusterProfile, load_profile, profile_names
from distseq.plan.search import Candidate, rank_layouts

__all__ = ["Candidate", "ClusterProfile", "Prediction", "load_profile", "predict_step", "profile_names", "rank_layouts"]

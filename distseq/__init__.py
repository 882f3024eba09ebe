"""distseq: sequence-parallel training of hybrid linear/full-attention MoE language models.

Every sequence-parallel strategy talks through one :class:`Communicator` and reads one
:class:`SequenceLayout`; :class:`ParallelDims` validates and builds the device mesh.
"""

from distseq.parallel.comm import CommStats, CommunicationError, Communicator
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.mesh import MeshAxis, ParallelDims
from distseq.parallel.sequence.conv import causal_conv1d
from distseq.parallel.sequence.registry import make_strategy

__version__ = "0.1.0"

__all__ = [
    "CommStats",
    "Communicator",
    "CommunicationError",
    "MeshAxis",
    "ParallelDims",
    "SequenceLayout",
    "__version__",
    "causal_conv1d",
    "make_strategy",
]

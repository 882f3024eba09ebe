"""Everything that talks over process groups: communicator, mesh, layout and the SP strategies."""

from distseq.parallel.comm import CommHandle, CommStats, CommunicationError, Communicator, P2PExchange
from distseq.parallel.layout import Chunk, LayoutKind, SequenceLayout
from distseq.parallel.mesh import MeshAxis, ParallelDims

__all__ = [
    "Chunk",
    "CommHandle",
    "CommStats",
    "Communicator",
    "CommunicationError",
    "LayoutKind",
    "MeshAxis",
    "P2PExchange",
    "ParallelDims",
    "SequenceLayout",
]

"""Runtime: communicators, the per-rank program, the parallel module, simulation."""

from distrifx.runtime.comm import CommStats, Communicator, ProcessGroupCommunicator, SimulatedGroup, SimulatedWorld
from distrifx.runtime.controlnet import ParallelControlNet
from distrifx.runtime.module import ParallelModule
from distrifx.runtime.simulate import simulate

__all__ = [
    "CommStats",
    "Communicator",
    "ProcessGroupCommunicator",
    "SimulatedGroup",
    "SimulatedWorld",
    "ParallelModule",
    "ParallelControlNet",
    "simulate",
]

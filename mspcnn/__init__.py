"""mspcnn: reference reproduction of MSP-CNN (Shen et al., ACM MM 2017).

Subpackages:
    mspcnn.ops   the wide-search normalized cross-correlation (NCC) operators

Importing mspcnn before torch sets OpenMP's wait policy to passive (unless OMP_WAIT_POLICY is
already set): threads that wait at the barrier after each operation sleep instead of spinning, so
a training on a machine shared with other processes does not slow down several times over (see
mspcnn/runtime.py). OpenMP reads the setting once, when PyTorch loads it: the tools import mspcnn
first; a program that imported torch before mspcnn keeps the spinning default.
"""
import os as _os
import sys as _sys

# True when the policy came from mspcnn and took effect (torch not loaded yet).
PASSIVE_WAIT = "OMP_WAIT_POLICY" not in _os.environ and "torch" not in _sys.modules
if PASSIVE_WAIT:
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

__version__ = "0.1.0"

"""Default values that several modules share, each written once.

The NCC operator's defaults (patch side, search rows, eps; the values of [2],
Subramaniam et al., NIPS 2016) are the defaults of :func:`mspcnn.ops.ncc_max`,
of its plain-PyTorch reference, of :func:`mspcnn.losses.ncc_loss` and of the
``NCCLossParameter`` message of the Caffe schema (:mod:`mspcnn.caffe.proto`),
so a prototxt that leaves a field out gets the same value as a Python call.
The loss thresholds default to values that keep every patch (see
docs/method.md, "Low-level similarity loss").

This module imports nothing, so that the schema, the operators and the model
can all read it.
"""

NCC_PATCH = 5           # P: patches are P x P
NCC_SEARCH_ROWS = 5     # R: candidate rows r - R//2 .. r + R//2
NCC_EPS = 0.01          # added to each patch's standard deviation
NCC_POS_FLOOR = -1.0    # positive pairs: patches with NCC below this are ignored (-1: none)
NCC_NEG_CEILING = 1.0   # negative pairs: patches with NCC above this are ignored (1: none)

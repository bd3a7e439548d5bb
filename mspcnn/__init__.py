"""mspcnn: reference reproduction of MSP-CNN (Shen et al., ACM MM 2017).

Subpackages:
    mspcnn.ops   the wide-search normalized cross-correlation (NCC) operators
"""
__version__ = "0.1.0"

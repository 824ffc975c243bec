"""Data contracts, the lowest layer; imports no other package of the project, nor Ray or torch.

Typed config, column names, feature kinds, fitted state, pure batch transforms, the row
encoders prepare and serving share, split labels and the run-directory layout. The stage
that reads and writes data is ``prepare``.
"""

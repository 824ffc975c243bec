"""Data contracts, the lowest layer; imports no other package of the project.

Typed config, column names, feature kinds, fitted state, pure batch transforms and row
builders, the split, the run-directory layout, and the prepare step (its only Ray Data
module).
"""

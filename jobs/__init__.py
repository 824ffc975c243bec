"""Thin entry points: ``python -m jobs.NAME`` or ``ray job submit -- python -m jobs.NAME``.

Each job parses flags into a config, starts or joins Ray (:mod:`jobs.ray_setup`) and
calls named steps of the packages below. Nothing imports ``jobs``.
"""

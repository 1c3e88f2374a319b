"""The experiments built on the library: each with its data, metrics, job and report.

:mod:`.tokfsm` (the main job: a random finite state machine as digit tokens),
:mod:`.stories` (generated topic stories: index, search and steer on natural language) and
:mod:`.synthetic` (one layer on clustered data, a self-check).
"""

"""`sparta tune`: search a recipe's density, learning rate or any other key with Optuna.

`settings` reads the `tune:` section and flags into a plan, `study` keeps it in Optuna's storage
(resumable, shareable), `worker` trains trials, `run` drives workers and the display, `outputs`
and `plots` write the study folder. Design: docs/tune.md.
"""

"""Lightning-free core of lightning_hprune: plain torch and torch-pruning only.

Nothing under ``lightning_hprune.core`` imports Lightning, so graph handling, criteria, schedules,
plans, optimizer-state surgery and measurement can be tested in milliseconds and reused elsewhere.
"""

"""Models: the registry of approved checkpoints in the models folder, the offline smoke-test model and bundled configs.

Nothing here imports torch at module level: the API process lists and validates models too.
"""

"""Run folders on disk: their layout, checkpoints, atomic writes and start-up checks.

``run_folder`` writes and reads a run's config, versions, seed and metrics; ``checkpoint``
saves and restores resumable checkpoints (safetensors only); ``io`` holds the atomic
writers; ``preflight`` checks the machine and the named resources before anything loads.
Imports ``detoxrl.errors`` and ``detoxrl.config``.
"""

"""Training in PyTorch: one loop (loop.py), its checkpoints (checkpoints.py) and the trainers built on it."""

"""Training in PyTorch: one loop (loop.py) and the trainers built on it."""

"""Composition of the stages: the training loop (``loop.py``), its set-up and preflight checks
(``setup.py``), the megatron-core actor (``actor.py``), micro-batching, scoring, checkpoints and
metrics.

This is the only layer that reads config objects and turns them into explicit arguments for the
pure layers below (data, rewards, rl, ops, models, rollout).
"""

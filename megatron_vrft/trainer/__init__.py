"""Composition of the stages: the reward/eval pipeline today, the GRPO trainer loop next.

This is the only layer that reads config objects and turns them into explicit arguments for the
pure layers below (data, rewards, rl, ops, models, rollout).
"""

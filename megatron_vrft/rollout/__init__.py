"""Rollout: engines that turn prompts into groups of sampled completions.

``scripted.py`` samples completions of a chosen quality from the ground truth (a policy with known
behaviour, for the reward/eval pipeline and tests); ``hf_generate.py`` generates with a Hugging Face
Qwen2-VL model on CPU. The vLLM engine and the weight-synchronised CPU engine of the trainer share
their interface and land with the trainer loop.
"""

"""Rollout: the typed hand-offs of a step and the engines that turn prompts into groups of completions.

``types.py`` (``SamplingParams``, ``RolloutBatch``, ``ScoredBatch``), ``engine.py`` (the protocol and
selection by name), ``hf_engine.py`` (transformers ``generate``), ``vllm_engine.py`` (colocated vLLM)
and ``weight_export.py`` (trainer TP/PP shards -> HF tensors, bucketed). Only this package imports vLLM.
"""

"""Rollout engines (torch KV-cache sampler, vLLM)."""

"""Pure algorithm math: lean log-probs, the SFT loss, GRPO objective, PHI hint sampling."""

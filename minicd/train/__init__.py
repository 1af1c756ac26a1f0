"""Stage loops: SFT, GRPO, PHI."""

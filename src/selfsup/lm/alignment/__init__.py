"""Alignment after SFT: sampling and scoring answers, PPO, best-of-n and the RLHF measurements."""

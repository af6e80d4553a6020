"""Training language models: pretraining (`pretrain_lm`) and the supervised stages after it
(SFT, reward model)."""

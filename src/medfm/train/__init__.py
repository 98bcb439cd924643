"""Training infrastructure shared by pre-training and fine-tuning (Lightning CLI, distributed pieces)."""

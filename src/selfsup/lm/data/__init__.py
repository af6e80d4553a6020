"""Language data: text corpora, tokenizers, chat batches, and the arithmetic task with its
simulated labelers."""

"""Language models: GPT, BERT, word2vec, and Hugging Face model folders in run directories."""

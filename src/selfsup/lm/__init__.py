"""Language self-supervision: corpora, tokenizers and language models (`selfsup lm ...`).

The pretraining kinds of `selfsup lm pretrain KIND` are registered in
`selfsup.lm.methods.PRETRAIN`, the stages after it in `selfsup.lm.alignment.ALIGN`.
"""

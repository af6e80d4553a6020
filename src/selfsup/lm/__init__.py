"""Language self-supervision: corpora, tokenizers and language models (`selfsup lm ...`).

MODELS maps each `selfsup lm pretrain KIND` to the module that implements it (imported only
when used); see `selfsup.lm.training.pretrain` for what such a module provides.
"""

from __future__ import annotations

MODELS: dict[str, str] = {
    "gpt": "selfsup.lm.models.gpt",
    "bert": "selfsup.lm.models.bert",
    "word2vec": "selfsup.lm.models.word2vec",
}

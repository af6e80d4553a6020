"""The language pretraining methods, registered by name: `selfsup lm pretrain KIND`.

As the image half's METHODS: a name maps to "module:Class", and a kind's file declares its
`Options` dataclass beside its class. The class states as literals what the command line shows
before anything is imported: `help`, `defaults` (its own defaults of LMConfig's options),
`presets`, and `entry` for a kind with a loop of its own (word2vec: the named function of its
file takes its Options, which are then its whole configuration); a kind without `entry` is a
`selfsup.lm.models.base.LanguageModule` trained by `pretrain_lm` with LMConfig beside its
Options. All of it is read from the source (`ast`): listing, `--help` and usage errors import no
torch. A new kind is its file plus one line below.
"""

from __future__ import annotations

from selfsup.core.registry import Registry

PRETRAIN = Registry(
    {
        "gpt": "selfsup.lm.models.gpt:GPTModule",
        "bert": "selfsup.lm.models.bert:BertModule",
        "word2vec": "selfsup.lm.models.word2vec:Word2Vec",
    }
)

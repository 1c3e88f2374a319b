"""The TokFSM experiment (the main job): a random finite state machine written as digit tokens.

:mod:`.data` (the machine, its tokenizer and datasets), :mod:`.metrics` (state accuracy,
state codes against neurons, intervention measures), :mod:`.job` (``codebook-features demo``:
train, finetune with codebooks, measure), :mod:`.analysis` (the paper's analyses of a
codebook model, as the authors run them) and :mod:`.report` (``report.html``).
"""

from .data import (
    BOS_TOKEN,
    BOS_TOKEN_ID,
    VOCAB_SIZE,
    TokFSM,
    TokFSMConfig,
    TokFSMSample,
    build_dataset,
    build_splits,
    build_tokenizer,
)

__all__ = ["BOS_TOKEN", "BOS_TOKEN_ID", "VOCAB_SIZE", "TokFSM", "TokFSMConfig", "TokFSMSample",
           "build_dataset", "build_splits", "build_tokenizer"]

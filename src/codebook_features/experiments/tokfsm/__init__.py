"""The TokFSM experiment (the main job): a random finite state machine written as digit tokens.

:mod:`.data` (the machine, its tokenizer and datasets), :mod:`.metrics` (state accuracy,
state codes against neurons, intervention measures); the job, its analysis and report sit
beside them.
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

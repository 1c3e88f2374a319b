"""Datasets the project makes itself: the TokFSM task and generated topic stories."""

from .tokfsm import (
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

__all__ = [
    "BOS_TOKEN",
    "BOS_TOKEN_ID",
    "VOCAB_SIZE",
    "TokFSM",
    "TokFSMConfig",
    "TokFSMSample",
    "build_dataset",
    "build_splits",
    "build_tokenizer",
]

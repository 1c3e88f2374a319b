"""TokFSM metrics: sampled state accuracy, state codes vs. neurons, interventions.

The model side works with any causal LM :mod:`codebook_features.lm` serves (LM loss and
accuracy, ``lm_metrics``, live there and are re-exported here); the analysis functions take
plain tensors. Token ids follow :mod:`codebook_features.experiments.tokfsm.data`: digits are
ids 0..9, BOS is 10.

Definitions used throughout:

* *current state* of a token position: the state whose digit sits there; BOS has state -1
  and is ignored by the code/neuron statistics.
* *state accuracy*: sample sequences from the model starting at BOS, decode them into states,
  and count the fraction of consecutive state pairs ``(s_i, s_{i+1})`` that are edges of the
  FSM; a pair involving an undecodable state (a BOS token in a digit slot, or a number
  >= num_states) counts as invalid.

One module a part: :mod:`.accuracy` (sampling and the model's next-state probabilities),
:mod:`.state_codes`, :mod:`.neurons` (the neuron baseline), :mod:`.code_search` (the authors'
code search) and :mod:`.interventions`; every name is importable from here.
"""

from __future__ import annotations

# Names the single module held before the split, kept importable from here (the TokFSM demo
# reads some of them through codebook_features.fsm).
from .... import lm  # noqa: F401
from ....errors import CodebookError  # noqa: F401
from ....lm import LMMetrics, _eval_mode, _logits, lm_metrics, model_device  # noqa: F401
from ..data import BOS_TOKEN_ID, NUM_DIGIT_TOKENS, TokFSM  # noqa: F401
from .accuracy import (
    first_transition_accuracy,
    fsm_digit_grid,  # noqa: F401
    next_state_probs,
    sample_states_from_model,
    sample_tokens,
    state_accuracy,
    transition_accuracy,
)
from .code_search import StateCodeSearch, best_neuron_at_recall, state_code_search
from .interventions import (
    InterventionEffect,
    _successor_mask,  # noqa: F401
    intervention_effect,
    js_divergence,
    successor_mass,
)
from .neurons import (
    NeuronStatePrecision,
    _precision_at,  # noqa: F401
    _prepare_acts,  # noqa: F401
    _recall_rank,  # noqa: F401
    _state_blocks,  # noqa: F401
    neuron_precision_at_code_recall,
    neuron_state_precision,
)
from .state_codes import CodeStateStats, _check_states, code_state_precision  # noqa: F401

__all__ = [
    "CodeStateStats",
    "InterventionEffect",
    "LMMetrics",
    "NeuronStatePrecision",
    "StateCodeSearch",
    "best_neuron_at_recall",
    "code_state_precision",
    "first_transition_accuracy",
    "intervention_effect",
    "js_divergence",
    "lm_metrics",
    "neuron_precision_at_code_recall",
    "neuron_state_precision",
    "next_state_probs",
    "sample_states_from_model",
    "sample_tokens",
    "state_accuracy",
    "state_code_search",
    "successor_mass",
    "transition_accuracy",
]

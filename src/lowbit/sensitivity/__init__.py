"""Layer sensitivity for mixed 4/2-bit precision: which layers of a W4A4 network can drop to 2 bits.

Every method returns one :class:`SensitivityTable` (per candidate layer: score, MACs, parameters, method
fields; per method: wall time and forward / backward / Hessian-vector passes and epochs spent). Higher score =
more sensitive = keep at 4 bits.

=========== ================================================================ ============================
method      score                                                            cost
=========== ================================================================ ============================
``eagl``    entropy of the layer's 4-bit weight codes (EAGL, reconstructed)  no data, milliseconds
``alps``    val-accuracy drop after dropping the layer + one-epoch fine-tune one epoch per candidate
``hessian`` Hutchinson Tr(H)/n · ||Q2(W) - W||² (HAWQ-V2/V3 baseline)         iterations × batches × HVP
``random``  seeded uniform draws (the control)                               none
=========== ================================================================ ============================

    table = eagl_scores(model, variant="h4", example_input=x)
    table = sensitivity("runs/w4a4", "alps", "runs/sens-alps", workers=2)    # the CLI's function
"""

from lowbit.sensitivity.alps import REFERENCES, alps_fit_config, alps_scores
from lowbit.sensitivity.api import METHODS, OPTIONS, load_w4a4_run, score_layers, sensitivity
from lowbit.sensitivity.candidates import candidate_layers
from lowbit.sensitivity.control import random_scores
from lowbit.sensitivity.eagl import VARIANTS, code_entropy, eagl_scores
from lowbit.sensitivity.hessian import hessian_scores, hutchinson_traces
from lowbit.sensitivity.table import PASS_KEYS, SensitivityRow, SensitivityTable

__all__ = [
    "METHODS", "OPTIONS", "PASS_KEYS", "REFERENCES", "VARIANTS", "SensitivityRow", "SensitivityTable",
    "alps_fit_config", "alps_scores", "candidate_layers", "code_entropy", "eagl_scores", "hessian_scores",
    "hutchinson_traces", "load_w4a4_run", "random_scores", "score_layers", "sensitivity",
]

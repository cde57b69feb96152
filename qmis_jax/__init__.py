"""qmis_jax: Membership Inference Security of quantized models, in JAX.

How much does a post-training quantizer protect a model's training data against membership inference, and what
does it cost in accuracy? qmis_jax computes the asymptotic indicator ``r_Q^n`` and the MIS approximation of
theory.md, checks them against attacks (LOSS, LiRA) on thousands of shadow replicates trained at once, and ranks
quantizers on privacy and utility.

>>> import jax, qmis_jax as qj
>>> problem = qj.problems.gaussian_mean(mu=[0.3])
>>> report = qj.audit(jax.random.key(0), problem, ["fp32", "int4"], n=100, replicates=64)  # doctest: +SKIP
"""

from qmis_jax import _runtime, attacks, indicator, problems, quantizers, stats, store, train
from qmis_jax._cache import enable_compilation_cache
from qmis_jax._version import __version__
from qmis_jax.audit import AuditReport, audit, audit_model

_runtime.warn_if_affected()  # an affected jaxlib on the CPU backend (decided without starting a backend)

__all__ = [
    "AuditReport",
    "__version__",
    "attacks",
    "audit",
    "audit_model",
    "enable_compilation_cache",
    "indicator",
    "problems",
    "quantizers",
    "stats",
    "store",
    "train",
]

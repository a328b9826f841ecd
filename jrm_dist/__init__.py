"""jrm-dist: distributed training of Joint Reward Models (Gaussian reward head + LM head on one VLM).

Data flow (see docs/DESIGN.md): data_prep → jrm_dist.data → jrm_dist.model → jrm_kernels → jrm_dist.train
→ jrm_dist.tracking → export → eval / serve.
"""

__version__ = "0.1.0"

"""HTTP reward server for online RL (``jrm-serve``) and its Python client (Flow-GRPO-style reward fn)."""

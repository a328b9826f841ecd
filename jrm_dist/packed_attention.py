"""Tree attention for group-packed rows (see ``jrm_dist.data.packing``).

A packed row is ``[prefix_g][suffix_g,1]..[suffix_g,K]`` for each group g. The text model is called
with ``attention_mask={layer_type: TreeMask}``; transformers hands a dict mask through unchanged to
every layer's attention function, which is ours (``jrm_tree``, registered with transformers'
``AttentionInterface``). For any other mask it is exactly the ``sdpa`` function, so an unpacked batch
runs the reference path even on a model that has served a packed one.

Two implementations of the same mask:

* ``gather`` (default, CPU and GPU): two batched SDPA calls per layer. Prefixes: causal, one row per
  group. Suffixes: one row per candidate whose keys are [its group's prefix | its own suffix], with
  "prefix all visible, suffix causal". Work per candidate is what it is unpacked minus the prefix
  queries, and nothing is computed across candidates or groups (a dense T x T mask would do
  T^2 work for sum_g T_g^2 useful).
* ``flex`` (opt-in on CUDA: ``JRM_PACKED_ATTENTION=flex``): one FlexAttention call with a BlockMask
  built from per-token (group, branch) ids. Not exercised by the CPU test suite.

The switch to ``jrm_tree`` is permanent on the text config (set on the first packed forward, before
any gradient-checkpoint recomputation could need it).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

NAME = "jrm_tree"
_REGISTERED = False


class TreeMask:
    """Gather indices of the tree mask of one packed row, built once per forward.

    ``prefix`` [G, 2] (start, length) per group; ``branch`` [C, 3] (group, start, length) per candidate.
    ``shape`` looks like a 4-D mask so transformers' mask utilities pass it through as-is."""

    def __init__(self, prefix: torch.Tensor, branch: torch.Tensor, T: int):
        dev = branch.device
        self.T = T
        self.shape = (1, 1, T, T)
        prefix, branch = prefix.to(dev), branch.to(dev)
        P = prefix[branch[:, 0], 1]  # prefix length of each candidate's group
        P0 = prefix[branch[:, 0], 0]
        S = branch[:, 2]
        Pm, Sm = int(P.max()), int(S.max())
        j_s = torch.arange(Sm, device=dev)
        self.q_valid = j_s[None, :] < S[:, None]  # [C, Sm]
        self.q_idx = torch.where(self.q_valid, branch[:, 1:2] + j_s[None, :], 0)
        j_p = torch.arange(Pm, device=dev)
        p_valid = j_p[None, :] < P[:, None]  # [C, Pm]
        kv_p = torch.where(p_valid, P0[:, None] + j_p[None, :], 0)
        self.kv_idx = torch.cat([kv_p, self.q_idx], 1)  # [C, Pm + Sm]
        causal = j_s[None, :, None] >= j_s[None, None, :]  # query i sees own suffix j <= i
        s_mask = causal & self.q_valid[:, None, :]
        self.kv_mask = torch.cat([p_valid[:, None, :].expand(-1, Sm, -1), s_mask], 2).unsqueeze(1)
        keep = prefix[:, 1] > 0
        self.has_prefix = bool(keep.any())
        if self.has_prefix:
            pre = prefix[keep]
            Gm = int(pre[:, 1].max())
            j = torch.arange(Gm, device=dev)
            self.p_valid = j[None, :] < pre[:, 1:2]  # [G', Gm]
            self.p_idx = torch.where(self.p_valid, pre[:, 0:1] + j[None, :], 0)
            self.p_mask = ((j[:, None] >= j[None, :])[None] & self.p_valid[:, None, :]).unsqueeze(1)
        self._prefix, self._branch = prefix, branch
        self._block_mask = None

    # ------------------------------------------------------------------ implementations
    def gather_attention(self, q, k, v, scaling, dropout):
        """q [1, H, T, D], k/v [1, H, T, D] (kv heads already repeated) → [1, T, H, D]."""
        H, D = q.shape[1], q.shape[-1]
        q0, k0, v0 = q[0], k[0], v[0]  # [H, T, D]
        qs = q0[:, self.q_idx].transpose(0, 1)  # [C, H, Sm, D]
        ks = k0[:, self.kv_idx].transpose(0, 1)
        vs = v0[:, self.kv_idx].transpose(0, 1)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=self.kv_mask, dropout_p=dropout, scale=scaling)
        pos = [self.q_idx[self.q_valid]]
        vals = [o.transpose(1, 2)[self.q_valid]]  # [n, H, D]
        if self.has_prefix:
            qp = q0[:, self.p_idx].transpose(0, 1)
            kp = k0[:, self.p_idx].transpose(0, 1)
            vp = v0[:, self.p_idx].transpose(0, 1)
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=self.p_mask, dropout_p=dropout, scale=scaling)
            pos.append(self.p_idx[self.p_valid])
            vals.append(op.transpose(1, 2)[self.p_valid])
        vals = torch.cat(vals)
        out = vals.new_zeros((self.T, H, D)).index_copy(0, torch.cat(pos), vals)
        return out.unsqueeze(0)

    def flex_attention(self, q, k, v, scaling):
        """One FlexAttention call (CUDA); q/k/v as in ``gather_attention``."""
        from torch.nn.attention.flex_attention import create_block_mask

        if self._block_mask is None:
            group, branch = token_segments(self._prefix, self._branch, self.T)

            def mask_mod(b, h, qi, ki):
                return (group[qi] == group[ki]) & (ki <= qi) & ((branch[ki] == 0) | (branch[ki] == branch[qi]))

            self._block_mask = create_block_mask(mask_mod, 1, None, self.T, self.T, device=q.device)
        out = _compiled_flex()(q, k, v, block_mask=self._block_mask, scale=scaling)
        return out.transpose(1, 2).contiguous()


_FLEX = None


def _compiled_flex():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=True)
    return _FLEX


def token_segments(prefix: torch.Tensor, branch: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token group id and branch id (0 = the group's prefix, 1.. = candidate) of a packed row."""
    group = torch.zeros(T, dtype=torch.long, device=branch.device)
    br = torch.zeros(T, dtype=torch.long, device=branch.device)
    for g, (s, n) in enumerate(prefix.tolist()):
        group[s:s + n] = g
    for c, (g, s, n) in enumerate(branch.tolist()):
        group[s:s + n] = g
        br[s:s + n] = c + 1
    return group, br


def tree_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """``jrm_tree``: tree attention for a TreeMask, the stock ``sdpa`` function for anything else."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if not isinstance(attention_mask, TreeMask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    n_rep = getattr(module, "num_key_value_groups", 1)
    if os.environ.get("JRM_PACKED_ATTENTION", "gather") == "flex" and query.is_cuda:
        return attention_mask.flex_attention(query, repeat_kv(key, n_rep), repeat_kv(value, n_rep), scaling), None
    return attention_mask.gather_attention(query, repeat_kv(key, n_rep), repeat_kv(value, n_rep), scaling,
                                           dropout), None


def enable_tree_attention(text_model) -> None:
    """Point the text model's attention at ``jrm_tree`` (sdpa for ordinary masks). Needs sdpa."""
    global _REGISTERED
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if not _REGISTERED:
        AttentionInterface.register(NAME, tree_attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _REGISTERED = True
    cfg = text_model.config
    impl = cfg._attn_implementation
    if impl == NAME:
        return
    if impl != "sdpa":
        raise ValueError(f"data.packing=group needs model.attn_implementation=sdpa (the text model uses {impl!r}); "
                         "packed rows use their own tree attention")
    cfg._attn_implementation_internal = NAME

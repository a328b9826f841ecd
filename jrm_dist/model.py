"""JointRewardModel: one VLM backbone, two heads.

* reward head — a small MLP (computed in fp32) on the hidden state at ``<|reward|>`` → (mu, log_var);
* the backbone's own LM head — masked cross-entropy on the rationale tokens that follow.

The LM loss is computed **inside the forward of the LM-head module** (its class is extended in place
by ``attach_lm_loss``): under ZeRO-3 the module's pre-forward hook gathers the partitioned weight and
its gradient is reduce-scattered as usual; reading ``lm_head.weight`` from outside would see an empty
partition. Only labelled positions are gathered and projected: never the full [B, T, V] logits.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from jrm_dist.backbones import load_backbone
from jrm_dist.losses import masked_lm_loss
from jrm_dist.packed_attention import NAME as TREE_ATTENTION
from jrm_dist.packed_attention import TreeMask, enable_tree_attention
from jrm_dist.processing import IGNORE_INDEX, JRM_CONFIG, REWARD_TOKEN

HEAD_WEIGHTS = "reward_head.safetensors"
FORMAT = "jrm-dist/1"


def lm_cross_entropy(hidden, weight, labels, bias=None, reduction="sum", impl="auto", **opts):
    """Masked CE of the LM head: the fused kernels (jrm_kernels) or the torch reference."""
    if impl == "auto":
        try:
            import jrm_kernels

            return jrm_kernels.fused_linear_masked_ce(hidden, weight, labels, bias=bias, reduction=reduction, **opts)
        except (ImportError, AttributeError):
            pass
    return masked_lm_loss(hidden, weight, labels, bias=bias, reduction=reduction)


class _LMHeadLossMixin:
    """Adds ``forward(hidden, labels=...) -> CE`` to an LM-head Linear, keeping ``forward(hidden) -> logits``."""

    ce_impl: str = "auto"
    ce_opts: dict = {}

    def forward(self, hidden, labels=None, reduction="sum"):  # type: ignore[override]
        if labels is None:
            return super().forward(hidden)
        return lm_cross_entropy(hidden, self.weight, labels, getattr(self, "bias", None), reduction,
                                self.ce_impl, **self.ce_opts)


def attach_lm_loss(lm_head: nn.Module, impl: str = "auto", **opts) -> nn.Module:
    """Extend the LM head's class in place (no new parameters, same state dict, same ZeRO-3 hooks)."""
    if not isinstance(lm_head, nn.Linear):
        raise TypeError(f"the LM head is a {type(lm_head).__name__}; JRM needs an nn.Linear-like output layer")
    if not isinstance(lm_head, _LMHeadLossMixin):
        lm_head.__class__ = type(f"{type(lm_head).__name__}WithLoss", (_LMHeadLossMixin, type(lm_head)), {})
    lm_head.ce_impl = impl
    lm_head.ce_opts = dict(opts)
    return lm_head


class RewardTokenEmbedding(nn.Module):
    """The ``<|reward|>`` input embedding, held apart from the vocabulary matrix so it trains at the
    head's learning rate while the 152k-row matrix keeps the backbone's. Substituted at the reward
    positions inside this module's forward (under ZeRO-3 the hook gathers its one partitioned row)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, inputs_embeds: torch.Tensor, is_reward: torch.Tensor) -> torch.Tensor:
        return torch.where(is_reward.unsqueeze(-1), self.weight.to(inputs_embeds.dtype), inputs_embeds)


HEAD_INPUT_NORMS = ("none", "standardize")


class RewardHead(nn.Module):
    """hidden → (mu, log_var); computed in fp32 whatever the backbone precision. Owns the reward-token
    embedding too, so everything new that JRM adds lives (and is saved, and gets ``optim.head_lr``) here.

    ``input_norm="standardize"``: the input is standardised per dimension with fixed statistics
    (buffers ``in_shift`` / ``in_scale``, set once by ``calibrate_head_input`` and saved with the head).
    Why: the reward-token states of a pretrained backbone are one shared vector plus candidate differences
    of a few % of its norm; on raw states the pair signal is a small part of every fc gradient."""

    def __init__(self, hidden_size: int, head_hidden: int, input_norm: str = "none"):
        super().__init__()
        if input_norm not in HEAD_INPUT_NORMS:
            raise ValueError(f"head input_norm {input_norm!r}: expected one of {HEAD_INPUT_NORMS}")
        self.input_norm = input_norm
        self.fc = nn.Linear(hidden_size, head_hidden)
        self.out = nn.Linear(head_hidden, 2)
        self.token = RewardTokenEmbedding(hidden_size)
        if input_norm == "standardize":
            self.register_buffer("in_shift", torch.zeros(hidden_size))
            self.register_buffer("in_scale", torch.ones(hidden_size))

    @torch.no_grad()
    def set_input_stats(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Standardise with this mean and variance from now on (a constant dimension keeps scale ~1/sqrt(eps))."""
        if self.input_norm != "standardize":
            raise ValueError("set_input_stats needs a head built with input_norm='standardize'")
        var = var.double().clamp(min=0)
        eps = 1e-5 * float(var.mean()) + 1e-12
        self.in_shift.copy_(mean.to(self.in_shift))
        self.in_scale.copy_((var + eps).rsqrt().to(self.in_scale))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.fc.weight, std=self.fc.in_features ** -0.5)
        nn.init.zeros_(self.fc.bias)
        nn.init.normal_(self.out.weight, std=0.01)
        nn.init.zeros_(self.out.bias)  # start at mu = 0, sigma = 1

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type=h.device.type, enabled=False):
            h = h.float()
            if self.input_norm == "standardize":
                h = (h - self.in_shift.float()) * self.in_scale.float()
            x = F.silu(F.linear(h, self.fc.weight.float(), self.fc.bias.float()))
            y = F.linear(x, self.out.weight.float(), self.out.bias.float())
        return y[:, 0], y[:, 1]


def gathered(params, modifier_rank: int | None = 0):
    """GatheredParameters under ZeRO-3 (params carry ``ds_id``), a no-op otherwise."""
    params = [p for p in params if p is not None]
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
    return contextlib.nullcontext()


@torch.no_grad()
def calibrate_head_input(model: "JointRewardModel", batches: list, all_reduce=None) -> int:
    """Set the head's input standardisation from the reward-token states of ``batches`` (prompt only).
    ``all_reduce`` (in-place sum over ranks) makes every rank set the same statistics. Returns the count."""
    feats = torch.cat([model.features(b).double() for b in batches])
    stats = torch.stack([feats.sum(0), (feats * feats).sum(0), torch.full_like(feats[0], float(len(feats)))])
    if all_reduce is not None:
        all_reduce(stats)
    n = stats[2, 0]
    if n < 2:
        raise ValueError(f"model.head_input_norm=standardize needs >= 2 candidates at the first step, got {int(n)}")
    mean = stats[0] / n
    var = (stats[1] / n - mean * mean).clamp(min=0) * n / (n - 1)
    model.reward_head.set_input_stats(mean, var)
    return int(n)


def add_reward_token(backbone: nn.Module, reward_token_id: int) -> None:
    """Make room for the reward token and initialise its embedding row(s) to the mean of the others
    (a neutral start the head can move; a random or zero row would be an outlier)."""
    emb = backbone.get_input_embeddings()
    n_rows = emb.weight.ds_shape[0] if hasattr(emb.weight, "ds_shape") else emb.weight.shape[0]
    if reward_token_id >= n_rows:
        backbone.resize_token_embeddings(reward_token_id + 1, mean_resizing=False)
    for mod in {id(m): m for m in (backbone.get_input_embeddings(), backbone.get_output_embeddings())}.values():
        with gathered([mod.weight]):
            w = mod.weight
            if w.numel() and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
                              or not hasattr(w, "ds_id")):
                with torch.no_grad():
                    w[reward_token_id] = w[:reward_token_id].float().mean(0).to(w.dtype)


def vocab_with_reward_row(embedding: torch.Tensor, token: torch.Tensor, reward_token_id: int) -> torch.Tensor:
    """A copy of the input-embedding matrix whose ``<|reward|>`` row holds the trained token embedding.

    Training keeps that embedding apart (``RewardHead.token``) and substitutes it at the reward position,
    so the vocabulary row never moves. Every writer of an exported backbone (``save_pretrained`` and
    ``jrm-export``) puts it back here, so plain transformers + the head's MLP score exactly as JRM does.
    With tied input/output embeddings the LM head's ``<|reward|>`` logit row changes too (never a label)."""
    out = embedding.detach().clone()
    out[reward_token_id] = token.detach().to(device=out.device, dtype=out.dtype)
    return out


class JointRewardModel(nn.Module):
    def __init__(self, backbone: nn.Module, reward_token_id: int, head_hidden: int = 1024, lm_ce: str = "auto",
                 ce_opts: dict | None = None, init_head: bool = True, head_input_norm: str = "none"):
        super().__init__()
        self.backbone = backbone
        self.reward_token_id = int(reward_token_id)
        self.head_hidden = int(head_hidden)
        hidden = backbone.config.get_text_config().hidden_size
        self.reward_head = RewardHead(hidden, head_hidden, head_input_norm)
        if init_head:
            emb = backbone.get_input_embeddings().weight
            with gathered(list(self.reward_head.parameters()) + [emb]):
                self.reward_head.reset_parameters()
                with torch.no_grad():  # start from the vocabulary row add_reward_token initialised
                    self.reward_head.token.weight.copy_(emb[self.reward_token_id].float())
        attach_lm_loss(backbone.get_output_embeddings(), lm_ce, **(ce_opts or {}))

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_backbone(cls, name_or_path: str, reward_token_id: int, head_hidden: int = 1024,
                      dtype: torch.dtype = torch.float32, attn_implementation: str = "auto", **kw):
        """A fresh JRM model on a pretrained backbone (adds and initialises the reward token)."""
        backbone = load_backbone(name_or_path, dtype=dtype, attn_implementation=attn_implementation)
        add_reward_token(backbone, reward_token_id)
        return cls(backbone, reward_token_id, head_hidden, **kw)

    def input_embedding_name(self) -> str:
        """The backbone state-dict name of the vocabulary (input-embedding) matrix."""
        emb = self.backbone.get_input_embeddings().weight
        return next(n for n, p in self.backbone.named_parameters(remove_duplicate=False) if p is emb)

    def jrm_config(self) -> dict[str, Any]:
        out = {"format": FORMAT, "reward_token": REWARD_TOKEN, "reward_token_id": self.reward_token_id,
               "head_hidden": self.head_hidden, "hidden_size": self.reward_head.fc.in_features,
               "head_dtype": "float32", "input_embedding": self.input_embedding_name()}
        if self.reward_head.input_norm != "none":  # absent = none: checkpoints without it load as before
            out["head_input_norm"] = self.reward_head.input_norm
        return out

    def save_pretrained(self, out_dir: str | Path, processor=None) -> None:
        """Backbone (safetensors; its ``<|reward|>`` row = the trained token, see ``vocab_with_reward_row``),
        reward head (safetensors, fp32), jrm_config.json, processor files."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = self.backbone.state_dict()
        name = self.input_embedding_name()
        state[name] = vocab_with_reward_row(state[name], self.reward_head.token.weight, self.reward_token_id)
        self.backbone.save_pretrained(out, state_dict=state, safe_serialization=True)
        save_file({k: v.detach().float().contiguous().cpu() for k, v in self.reward_head.state_dict().items()},
                  str(out / HEAD_WEIGHTS))
        jcfg = self.jrm_config()
        if processor is not None:
            processor.save_pretrained(str(out))
            jcfg["processor"] = processor.settings()  # scoring must encode inputs as training did
        (out / JRM_CONFIG).write_text(json.dumps(jcfg, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, attn_implementation: str = "auto",
                        lm_ce: str = "auto"):
        """Load a saved JRM model (safetensors only: no pickle)."""
        from safetensors.torch import load_file

        p = Path(path)
        cfg_file = p / JRM_CONFIG
        if not cfg_file.exists():
            raise FileNotFoundError(f"{cfg_file} not found: {p} is not a JRM checkpoint (export one with jrm-export)")
        jcfg = json.loads(cfg_file.read_text())
        if jcfg.get("format") != FORMAT:
            raise ValueError(f"{cfg_file}: unknown format {jcfg.get('format')!r}, expected {FORMAT}")
        backbone = load_backbone(str(p), dtype=dtype, attn_implementation=attn_implementation)
        model = cls(backbone, jcfg["reward_token_id"], jcfg["head_hidden"], lm_ce=lm_ce, init_head=False,
                    head_input_norm=jcfg.get("head_input_norm", "none"))
        missing, unexpected = model.reward_head.load_state_dict(load_file(str(p / HEAD_WEIGHTS)), strict=True)
        return model

    # ----------------------------------------------------------------- forward paths
    def _vision_kwargs(self, batch):
        if batch.get("pixel_values") is not None:
            return {"pixel_values": batch["pixel_values"], "image_grid_thw": batch["image_grid_thw"]}
        return {}

    def _dummy_vision(self, batch, like: torch.Tensor) -> torch.Tensor:
        """0 * vision(blank image) when the micro-batch has no image: keeps ZeRO-3 collectives in step."""
        if batch.get("pixel_values") is not None or batch.get("dummy_pixel_values") is None:
            return like.new_zeros(())
        feats = self.backbone.get_image_features(batch["dummy_pixel_values"], batch["dummy_image_grid_thw"])
        pooled = getattr(feats, "pooler_output", feats)
        if isinstance(pooled, (list, tuple)):
            pooled = torch.cat(list(pooled))
        return pooled.float().sum() * 0.0

    def _hidden(self, batch, input_ids, attention_mask, mm):
        # input_ids still go in next to the embeddings: the backbone finds image placeholders and
        # computes 3-D MRoPE positions from them.
        embeds = self.backbone.get_input_embeddings()(input_ids)
        embeds = self.reward_head.token(embeds, input_ids == self.reward_token_id)
        out = self.backbone.base_model(
            input_ids=input_ids, inputs_embeds=embeds, attention_mask=attention_mask, mm_token_type_ids=mm,
            use_cache=False, **self._vision_kwargs(batch))
        return out.last_hidden_state

    def supports_packing(self) -> bool:
        """Packed batches (data.packing=group, data.packing.pack_for_scoring) need the text model on sdpa."""
        return self.backbone.base_model.language_model.config._attn_implementation in ("sdpa", TREE_ATTENTION)

    def _packed_hidden(self, batch):
        """Hidden states of a group-packed row (jrm_dist.data.packing): distinct images encoded once,
        each candidate's own MRoPE ids, tree attention (shared prefix, then own suffix only)."""
        base = self.backbone.base_model
        input_ids, mm = batch["input_ids"], batch["mm_token_type_ids"]
        enable_tree_attention(base.language_model)
        embeds = self.backbone.get_input_embeddings()(input_ids)
        embeds = self.reward_head.token(embeds, input_ids == self.reward_token_id)
        if batch.get("pixel_values") is not None:
            feats = base.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
            pooled = getattr(feats, "pooler_output", feats)
            img = torch.cat([pooled[i] for i in batch["image_index"].tolist()]).to(embeds.dtype)
            where = (input_ids == base.config.image_token_id).unsqueeze(-1)
            embeds = embeds.masked_scatter(where, img)
        # 3-D MRoPE ids: the backbone's own get_rope_index on every candidate's unpacked sequence
        idx = batch["pack_index"]
        valid = idx >= 0
        safe = idx.clamp(min=0)
        pos_c, _ = base.get_rope_index(input_ids[0][safe], mm_token_type_ids=mm[0][safe] * valid,
                                       image_grid_thw=batch.get("rope_image_grid_thw"), attention_mask=valid.long())
        pos = torch.zeros((3, 1, input_ids.shape[1]), dtype=torch.long, device=input_ids.device)
        pos[:, 0, safe[valid]] = pos_c[:, valid]
        tree = TreeMask(batch["pack_prefix"], batch["pack_branch"], input_ids.shape[1])
        text = base.language_model
        masks = {t: tree for t in set(getattr(text.config, "layer_types", None) or ["full_attention"])}
        out = text(inputs_embeds=embeds, position_ids=pos, attention_mask=masks, use_cache=False)
        return out.last_hidden_state

    def _hidden_and_feats(self, batch):
        if batch.get("packed"):
            hidden = self._packed_hidden(batch)
            return hidden, hidden[0, batch["reward_pos"]]
        hidden = self._hidden(batch, batch["input_ids"], batch["attention_mask"], batch["mm_token_type_ids"])
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden, hidden[rows, batch["reward_pos"]]

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Training path: mu, log_var, reward-token features, and the LM loss parts
        (``lm_loss_sum`` over labelled tokens and their count ``lm_tokens``; the trainer normalises).
        A group-packed batch (``batch["packed"]``) keeps the unpacked label layout, so the LM part is shared.
        ``batch["labels"] = None`` (rank-only): the LM head is skipped, the LM parts are zeros."""
        hidden, feats = self._hidden_and_feats(batch)
        mu, log_var = self.reward_head(feats)
        zero = self._dummy_vision(batch, mu)
        mu = mu + zero
        if batch.get("labels") is None:  # rank-only step (alpha = 0): the LM head is not called at all
            return {"mu": mu, "log_var": log_var, "features": feats.float(), "lm_loss_sum": mu.new_zeros(()),
                    "lm_tokens": torch.zeros((), dtype=torch.long, device=mu.device)}
        labels = batch["labels"][:, 1:]  # position t predicts token t+1
        keep = labels != IGNORE_INDEX
        h = hidden[:, :-1][keep]
        y = labels[keep]
        lm_head = self.backbone.get_output_embeddings()
        lm_sum = lm_head(h, labels=y, reduction="sum")  # runs inside the LM head's forward (ZeRO-3 gathers it)
        return {"mu": mu, "log_var": log_var, "features": feats.float(), "lm_loss_sum": lm_sum,
                "lm_tokens": keep.sum()}

    @torch.no_grad()
    def score(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference path: the backbone up to the reward token only (no rationale, no LM head) → (mu, sigma).
        Also takes a packed batch (``data.packing.pack_for_scoring``: an item's candidates share their prefix)."""
        if batch.get("packed"):
            _, feats = self._hidden_and_feats(batch)
            mu, log_var = self.reward_head(feats)
            return mu, torch.exp(0.5 * log_var)
        end = int(batch["reward_pos"].max()) + 1
        hidden = self._hidden(batch, batch["input_ids"][:, :end], batch["attention_mask"][:, :end],
                              batch["mm_token_type_ids"][:, :end])
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        mu, log_var = self.reward_head(hidden[rows, batch["reward_pos"]])
        return mu, torch.exp(0.5 * log_var)

    @torch.no_grad()
    def features(self, batch: dict[str, Any]) -> torch.Tensor:
        """Reward-token hidden states (fp32) on the prompt only, for the effective-rank analysis."""
        if batch.get("packed"):
            return self._hidden_and_feats(batch)[1].float()
        end = int(batch["reward_pos"].max()) + 1
        hidden = self._hidden(batch, batch["input_ids"][:, :end], batch["attention_mask"][:, :end],
                              batch["mm_token_type_ids"][:, :end])
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, batch["reward_pos"]].float()

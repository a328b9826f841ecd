"""``jrm-train`` / ``python -m jrm_dist.train --config CFG [dotted.key=value ...] [--resume auto|none|PATH]``

The JRM training loop on a DeepSpeed engine (ZeRO-3 by default), one process per device, launched by
torchrun / SLURM (env:// rendezvous). Per optimizer step:

1. take ``train.grad_accum`` micro-batches from the streaming loader; all-reduce their rank-pair and
   labelled-token counts → the step's global divisors (the LM mean is over labelled tokens of all
   ranks and accumulation steps; the rank mean over all pairs);
2. per micro-batch: one forward over all candidates (reward head + LM CE inside the LM head's forward),
   ``L = (1 - alpha) L_rank + alpha L_LM``; one all-reduce agrees on (non-finite loss, stop requested);
   a non-finite loss on any rank poisons the backward on every rank so DeepSpeed's ZeRO optimizer
   discards the whole step (invalid global grad norm) — counted in ``skipped_steps``;
3. metrics reduced in one all-reduce, logged by rank 0 (MLflow in a background thread, steps.jsonl);
4. checkpoint every ``train.save_every`` steps, at the end, and on SIGTERM/SIGUSR1 (then exit
   ``REQUEUE_EXIT_CODE`` and write ``<output_dir>/REQUEUE`` so a launcher requeues; with nothing trained
   since the last checkpoint the signal exits at once); a save with diverged weights stops the run
   (``train.divergence_factor``); one run per output folder (lock), ranks die with torchrun (jrm_dist.runguard);
5. eval every ``train.eval_every`` steps on ``data.eval_shards``: accuracy, effective rank of the
   reward-token features, singular-value spectrum PNG;
6. at the end: consolidated HF export in ``<output_dir>/export`` (same code as ``jrm-export``).

Fault injection for the tests (real faults in the real stack, off unless set):
``JRM_FAULTS="kill@STEP:RANK,nan@STEP:RANK,signal@STEP:RANK:USR1,crash_save@STEP:RANK,crash_prune@STEP:RANK"``
(crash_prune: SIGKILL while the save at STEP deletes a pruned checkpoint, after part of it is gone;
``nan_weights@STEP:RANK``: after STEP, a NaN in this rank's partition of the first parameter;
``big_weights@STEP:RANK``: after STEP (before its save), this rank's partitions of every parameter times 1e6).

Failures are loud: ``train.max_consecutive_skips`` skipped steps in a row, or non-finite weights at a
save, stop the run with exit status 1 (``TrainingAborted``, not the requeue code); nothing non-finite
is ever saved, pointed to by ``latest``, or exported.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import resource
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "checkpointed after a preemption signal, requeue me"
REQUEUE_MARKER = "REQUEUE"
ABORT_EXIT_CODE = 1


class TrainingAborted(RuntimeError):
    """A run that cannot go on usefully (weights or losses not finite): exit 1, never requeue."""

log = logging.getLogger("jrm_dist.train")


# ----------------------------------------------------------------------------- small helpers

class Faults:
    """Test-only fault injection parsed from $JRM_FAULTS (see module doc)."""

    def __init__(self, spec: str, rank: int):
        self.rank = rank
        self.items: list[tuple[str, int, int, str]] = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            kind, _, rest = part.partition("@")
            bits = rest.split(":")
            if kind not in ("kill", "nan", "signal", "crash_save", "crash_prune", "nan_weights", "big_weights") \
                    or len(bits) < 2:
                raise ValueError(f"JRM_FAULTS: cannot parse {part!r} (kind@STEP:RANK[:SIG])")
            self.items.append((kind, int(bits[0]), int(bits[1]), bits[2] if len(bits) > 2 else ""))

    def hit(self, kind: str, step: int) -> str | None:
        for k, s, r, extra in self.items:
            if k == kind and s == step and r == self.rank:
                return extra or k
        return None

    def save_hook(self, where: str, step: int) -> None:
        if where == "save" and self.hit("crash_save", step):
            log.error("JRM_FAULTS: SIGKILL in the middle of saving step %d", step)
            os.kill(os.getpid(), signal.SIGKILL)
        if where == "prune" and self.hit("crash_prune", step):
            log.error("JRM_FAULTS: SIGKILL in the middle of pruning old checkpoints at step %d", step)
            os.kill(os.getpid(), signal.SIGKILL)


def _to_device(batch: dict[str, Any], dev: torch.device) -> dict[str, Any]:
    return {k: (v.to(dev, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _peak_mem_mb(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("DeepSpeed", "deepspeed", "httpx", "alembic", "mlflow", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# The per-micro-batch sums train_step all-reduces once per step (names, in tensor order).
_STEP_SUMS = ("total", "rank", "lm", "correct", "decided", "mu_sum", "mu_sq", "n_cand", "sigma_sum", "tokens",
              "groups", "lm_tokens", "nonfinite", "stop")


def _poison(loss: torch.Tensor) -> torch.Tensor:
    """A non-finite loss on any rank makes every rank's gradient non-finite: the ZeRO optimizer then sees an
    invalid global norm and discards the whole step (grads cleared, LR not stepped) on all ranks alike."""
    return loss * float("nan")


@torch.no_grad()
def _micro_sums(out: dict, b: dict, obj: dict, loss: torch.Tensor, nonfinite: bool, stop: bool) -> torch.Tensor:
    """One micro-batch's contribution to the step's ``_STEP_SUMS`` (a skipped micro-batch adds no loss)."""
    mu = out["mu"].detach().float()
    win, lose, tie = b["win_idx"], b["lose_idx"], b["tie"]
    dec = ~tie if tie.numel() else torch.ones_like(win, dtype=torch.bool)
    correct = (mu[win[dec]] > mu[lose[dec]]).sum() if win.numel() else 0
    sig = torch.exp(0.5 * out["log_var"].detach().float())
    return torch.tensor([0.0 if nonfinite else float(loss.detach()),
                         float(obj["rank"]), float(obj["lm"]), float(correct), float(dec.sum()),
                         float(mu.sum()), float((mu * mu).sum()), float(mu.numel()), float(sig.sum()),
                         float(b["attention_mask"].sum()), float(len(b["keys"])),
                         float(out["lm_tokens"]), float(nonfinite), float(stop)], dtype=torch.float64)


# ----------------------------------------------------------------------------- the trainer

class Trainer:
    def __init__(self, cfg, resume: str = "auto"):
        from jrm_dist import checkpoint as ck
        from jrm_dist.engine import device, init_distributed

        self.cfg = cfg
        init_distributed()
        self.dist = torch.distributed
        self.rank = self.dist.get_rank()
        self.world = self.dist.get_world_size()
        _setup_logging(self.rank)
        self.dev = device()
        self.out = Path(cfg.train.output_dir)
        self.faults = Faults(os.environ.get("JRM_FAULTS", ""), self.rank)
        self.stop_signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        self.run_lock = self._lock_output_dir()  # before the sweep: a live run's half-done save is not debris
        if self.rank == 0:
            (self.out / REQUEUE_MARKER).unlink(missing_ok=True)
            ck.sweep(self.out)  # half-done saves and prunes of a crashed run
        self.dist.barrier()
        self.resume_from = ck.find_resume(self.out, resume)
        self.saved_state = ck.read_state(self.resume_from) if self.resume_from else None

    def _lock_output_dir(self) -> int | None:
        """Rank 0 holds the output folder's run lock (jrm_dist.runguard); every rank learns the verdict, so
        all of them refuse together when another live run holds the folder."""
        from jrm_dist.runguard import OutputDirBusy, lock_output_dir

        fd, verdict = None, [None]
        if self.rank == 0:
            try:
                fd = lock_output_dir(self.out)
            except OutputDirBusy as e:
                verdict = [str(e)]
        self.dist.broadcast_object_list(verdict, src=0)
        if verdict[0]:
            raise OutputDirBusy(verdict[0])
        return fd

    def _on_signal(self, signum, frame) -> None:
        saved = getattr(self, "saved_step", None)
        if saved is None or saved == self.step:  # nothing trained since the last checkpoint: no step to wait for
            from jrm_dist.runguard import exit_for_requeue

            step = saved if saved is not None else int((getattr(self, "saved_state", None) or {}).get("step", 0))
            marker = REQUEUE_MARKER if getattr(self, "run_lock", None) is not None else None  # only into our folder
            exit_for_requeue(self.out, self.rank, signum, step, REQUEUE_EXIT_CODE, marker)
        if self.stop_signal is None:
            log.warning("received %s: will checkpoint after the current step and exit %d for requeue",
                        signal.Signals(signum).name, REQUEUE_EXIT_CODE)
        self.stop_signal = signum

    # ---- construction
    def build(self) -> None:
        from jrm_dist import checkpoint as ck
        from jrm_dist.data.loader import StreamingLoader
        from jrm_dist.engine import initialize, partition_stats
        from jrm_dist.processing import DEFAULT_PROMPT, RewardProcessor
        from jrm_dist.tracking import make_tracker

        cfg = self.cfg
        self.shards = self._train_shards()
        self.processor = RewardProcessor.from_pretrained(
            cfg.model.name, prompt=cfg.data.prompt or DEFAULT_PROMPT, max_pixels=cfg.data.max_pixels,
            min_pixels=cfg.data.min_pixels, max_length=cfg.data.max_length)
        universal = None
        if self.saved_state and self.saved_state["world_size"] != self.world:
            log.warning("resuming %s saved on %d ranks with %d ranks: loading through DeepSpeed's universal "
                        "checkpoint; the data cursor restarts the saved epoch and RNG streams are re-seeded",
                        self.resume_from, self.saved_state["world_size"], self.world)
            if self.rank == 0:
                universal = ck.to_universal(self.resume_from)
            self.dist.barrier()
            universal = self.resume_from / (ck.DS_TAG + "_universal")
        torch.manual_seed(cfg.train.seed)
        self.eng = initialize(cfg, self.processor.reward_token_id, self.world, load_universal=universal is not None)
        self.engine = self.eng.engine
        self.model = self.engine.module
        self.pstats = partition_stats(self.model)
        self.frozen_from = ck.frozen_source(self.model, cfg.model.name)
        log.info("model: %.3fM parameters, %.3fM on this rank (ZeRO stage %d, %d ranks)",
                 self.pstats["params_total"] / 1e6, self.pstats["params_local"] / 1e6, cfg.zero.stage, self.world)
        from jrm_dist.objective import rank_only
        data_cfg = cfg.data
        if rank_only(cfg.loss) and data_cfg.use_rationale:  # alpha = 0 throughout: do not encode rationales
            data_cfg = dataclasses.replace(data_cfg, use_rationale=False)
        self.loader = StreamingLoader.from_config(data_cfg, self.processor, rank=self.rank, world_size=self.world,
                                                  shards=self.shards)
        self.steps_per_epoch = len(self.loader) // cfg.train.grad_accum
        if self.steps_per_epoch == 0:
            raise SystemExit(f"{cfg.data.train_shards}: {len(self.loader)} micro-batches per rank per epoch < "
                             f"train.grad_accum={cfg.train.grad_accum}")
        self.step = 0
        self.counters = {"skipped_steps": 0, "samples": 0, "tokens": 0}
        run_id = None
        if self.resume_from is not None:
            st = self.saved_state
            tag = ck.DS_TAG + "_universal" if universal is not None else ck.DS_TAG
            ck.check_frozen_source(st.get("frozen_from"), cfg.model.name, self.resume_from)
            load_path, _ = self.engine.load_checkpoint(str(self.resume_from), tag=tag, load_optimizer_states=True,
                                                       load_module_strict=not st.get("frozen_from"),
                                                       load_lr_scheduler_states=True)
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load {self.resume_from / tag}")
            mine = ck.read_rank_state(self.resume_from, self.rank) if universal is None else \
                {"loader": {"ranks": [ck.read_rank_state(self.resume_from, r)["loader"]
                                      for r in range(st["world_size"])]}}
            self.loader.load_state_dict(mine["loader"])
            if universal is None:
                ck.set_rng_state(mine["rng"])
            else:
                torch.manual_seed(cfg.train.seed + 1000 * st["step"] + self.rank)
            self.step = int(st["step"])
            self.counters.update(st.get("counters", {}))
            run_id = st.get("mlflow_run_id")
            log.info("resumed from %s at step %d (MLflow run %s)", self.resume_from, self.step, run_id)
        self.tracker = make_tracker(cfg, self.rank)
        self.tracker.start(run_id, tags={"world_size": self.world, "zero_stage": cfg.zero.stage})
        if self.rank == 0:
            self._prepare_run_dir()
        self.it = None
        self.saved_step = self.step  # a checkpoint (or the untrained start) holds this state already
        self.start_norm = ck.weight_stats(self.model, self.dev)[2]  # the divergence guard's reference

    def _train_shards(self) -> list:
        """data.train_shards resolved (and with data.verify, every shard's sha256 checked, the shards split
        over the ranks) before the model is built, so a wrong path fails in seconds naming the key."""
        from jrm_dist.data.shards import resolve_config_shards, verify_shards

        err: list = [None]
        shards = []
        try:
            shards = resolve_config_shards("data.train_shards", self.cfg.data.train_shards)
        except (OSError, ValueError) as e:
            err = [str(e)]
        errs = [None] * self.world
        self.dist.all_gather_object(errs, err[0])
        if any(errs):
            raise TrainingAborted(next(e for e in errs if e))
        if self.cfg.data.verify:
            t0 = time.perf_counter()
            problems = [None] * self.world
            self.dist.all_gather_object(problems, verify_shards("data.train_shards", shards[self.rank::self.world]))
            problems = [p for part in problems for p in part]
            if problems:
                raise TrainingAborted(f"data.verify: {len(problems)} shard(s) differ from the manifest: "
                                      + "; ".join(problems[:5]))
            log.info("data.verify: %d shard(s) match their manifest sha256 (%.1fs)", len(shards),
                     time.perf_counter() - t0)
        return shards

    def _check_corrupt_fraction(self, m: dict) -> None:
        """Abort when the unusable records exceed data.max_corrupt_fraction of the epochs begun (the count is
        all-reduced in train_step, so every rank takes the same decision)."""
        n = sum(s.count for s in self.shards) * (self.loader.epoch + 1)
        bad = m.get("corrupt_samples", 0.0)
        if n and bad > self.cfg.data.max_corrupt_fraction * n:
            raise TrainingAborted(
                f"step {self.step}: {int(bad)} unusable record(s) in {self.loader.epoch + 1} epoch(s) of "
                f"{n // (self.loader.epoch + 1)} ({bad / n:.2%}) > data.max_corrupt_fraction="
                f"{self.cfg.data.max_corrupt_fraction}; the 'skipped corrupt record' warnings name shard, offset "
                f"and key (jrm-prep verify re-checks the shards)")

    def _prepare_run_dir(self) -> None:
        cfg = self.cfg
        self.config_yaml = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        (self.out / "config.yaml").write_text(self.config_yaml)
        self.tracker.log_params(cfg.flat())
        self.tracker.log_artifact(self.out / "config.yaml")
        manifest = Path(cfg.data.train_shards)
        manifest = manifest / "manifest.json" if manifest.is_dir() else manifest
        if manifest.name == "manifest.json" and manifest.exists():
            self.tracker.log_artifact(manifest, "data")
        steps_log = self.out / "steps.jsonl"
        if steps_log.exists():  # a resumed run rewrites the steps after its checkpoint
            keep = [ln for ln in steps_log.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["step"] <= self.step]
            steps_log.write_text("".join(ln + "\n" for ln in keep))

    # ---- data
    def _next_batch(self) -> dict | None:
        while True:
            if self.it is None:
                if self.loader.epoch >= self.cfg.train.epochs:
                    return None
                self.it = iter(self.loader)
            try:
                return next(self.it)
            except StopIteration:
                self.it = None

    def _calibrate_head(self, micro: list[dict]) -> None:
        """model.head_input_norm=standardize: the head's input statistics from the first step's reward-token
        states, summed over every rank and micro-batch so all ranks hold the same buffers."""
        from jrm_dist.model import calibrate_head_input

        self.engine.eval()
        n = calibrate_head_input(self.model, [_to_device(b, self.dev) for b in micro],
                                 all_reduce=lambda t: self.dist.all_reduce(t))
        log.info("reward head input standardised with the statistics of %d reward-token states", n)

    # ---- one optimizer step
    def train_step(self) -> dict[str, float] | None:
        """One optimizer step, read as the algorithm: micro-batches → objective → backward → agreed skip/step →
        metrics. The collectives that keep the ranks in lockstep live in the named helpers below."""
        from jrm_dist.objective import joint_objective

        cfg, step = self.cfg, self.step  # step: 0-based index of the step being taken
        t0 = time.perf_counter()
        micro = self._take_micro_batches()
        if micro is None:
            return None
        if self.step == 0 and self.resume_from is None and cfg.model.head_input_norm == "standardize":
            self._calibrate_head(micro)
        rank_items, lm_items = self._global_divisors(micro)
        self.engine.train()
        sums = torch.zeros(len(_STEP_SUMS), dtype=torch.float64)
        keys = []
        for b in micro:
            keys += b["keys"]
            b = _to_device(b, self.dev)
            out = self.engine(b)
            obj = joint_objective(out, b, cfg.loss, step, lm_items=lm_items, rank_items=rank_items)
            loss = self._inject_fault_nan(obj["loss"], step)
            nonfinite, stop = self._agree_flags(loss)
            if nonfinite:
                loss = _poison(loss)
            # Our loss is already a global mean (global divisors): undo DeepSpeed's 1/gas and 1/world.
            self.engine.backward(loss * self.world, scale_wrt_gas=False)
            self.engine.step()
            sums += _micro_sums(out, b, obj, loss, nonfinite, stop)
        s = self._reduce_sums(sums)
        skipped = s["nonfinite"] > 0
        if skipped and self.engine.was_step_applied():
            raise RuntimeError("a non-finite loss was agreed on but DeepSpeed applied the step")
        self.step += 1
        self._count_step(s, skipped)
        return self._step_metrics(s, obj, rank_items, time.perf_counter() - t0, skipped, keys)

    def _take_micro_batches(self) -> list[dict] | None:
        """``train.grad_accum`` micro-batches of this step (None when the data is exhausted); the LM labels are
        dropped where alpha is 0 at this step, so the model does no LM work there."""
        from jrm_dist.objective import drop_lm

        micro = []
        for _ in range(self.cfg.train.grad_accum):
            b = self._next_batch()
            if b is None:
                return None
            micro.append(drop_lm(b, self.cfg.loss, self.step))
        return micro

    def _global_divisors(self, micro: list[dict]) -> tuple[float, float]:
        """(rank pairs, labelled LM tokens) of the whole step over all ranks and micro-batches: one all-reduce,
        so the loss is the one-big-batch mean whatever the data-parallel / accumulation split."""
        from jrm_dist.objective import local_items

        items = torch.zeros(2, dtype=torch.float64)
        for b in micro:
            p, t = local_items(b, self.cfg.loss)
            items += torch.tensor([p, t], dtype=torch.float64)
        items = items.to(self.dev)
        self.dist.all_reduce(items)
        return float(items[0]), float(items[1])

    def _inject_fault_nan(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        if self.faults.hit("nan", step + 1):
            log.error("JRM_FAULTS: injecting a NaN loss at step %d", step + 1)
            return _poison(loss)
        return loss

    def _agree_flags(self, loss: torch.Tensor) -> tuple[bool, bool]:
        """(some rank's loss is not finite, some rank was asked to stop): one MAX all-reduce per micro-batch,
        so every rank skips the same steps and stops after the same step."""
        flags = torch.tensor([0.0 if bool(torch.isfinite(loss.detach())) else 1.0,
                              1.0 if self.stop_signal is not None else 0.0], device=self.dev)
        self.dist.all_reduce(flags, op=self.dist.ReduceOp.MAX)
        return bool(flags[0] > 0), bool(flags[1] > 0)

    def _reduce_sums(self, sums: torch.Tensor) -> dict[str, float]:
        """The per-micro-batch sums of every rank added up (one all-reduce), by name."""
        sums = sums.to(self.dev)
        self.dist.all_reduce(sums)
        return dict(zip(_STEP_SUMS, sums.cpu().tolist()))

    def _count_step(self, s: dict[str, float], skipped: bool) -> None:
        self.counters["samples"] += int(s["groups"])
        self.counters["tokens"] += int(s["tokens"])
        if skipped:
            self.counters["skipped_steps"] += 1
            log.warning("step %d: non-finite loss on %d micro-batch(es) across ranks; step skipped on all ranks",
                        self.step, int(s["nonfinite"]))

    def _step_metrics(self, s: dict[str, float], obj: dict, rank_items: float, dt: float, skipped: bool,
                      keys: list) -> dict[str, Any]:
        """The logged metrics of the step just taken (loss parts and grad norm only when it was applied); the
        corrupt-record count is summed over ranks so every rank takes the same abort decision."""
        n = max(s["n_cand"], 1.0)
        mu_mean = s["mu_sum"] / n
        lrs = self.engine.get_lr()
        groups = [g.get("name", str(i)) for i, g in enumerate(self.engine.optimizer.param_groups)]
        m = {
            "alpha": float(obj["alpha"]),
            "train/accuracy": s["correct"] / s["decided"] if s["decided"] > 0 else float("nan"),
            "mu/mean": mu_mean,
            "mu/std": math.sqrt(max(s["mu_sq"] / n - mu_mean ** 2, 0.0)),
            "sigma/mean": s["sigma_sum"] / n,
            "lr": float(lrs[0]),
            "tokens_per_s": s["tokens"] / dt,
            "samples_per_s": s["groups"] / dt,
            "pairs_per_s": rank_items / dt,
            "peak_mem_mb": _peak_mem_mb(self.dev),
            "skipped_steps": float(self.counters["skipped_steps"]),
            "corrupt_samples": float(self.loader.corrupt_samples),  # this rank's; summed below
            "step_time_s": dt,
        }
        if "head" in groups:
            m["lr/head"] = float(lrs[groups.index("head")])
        if not skipped:
            gn = self.engine.get_global_grad_norm()
            m.update({"loss/total": s["total"], "loss/rank": s["rank"], "loss/lm": s["lm"]})
            if gn is not None:
                m["grad_norm"] = float(gn)
        corrupt = torch.tensor([float(self.loader.corrupt_samples)], device=self.dev)
        self.dist.all_reduce(corrupt)
        m["corrupt_samples"] = float(corrupt)
        m["_stop"] = float(s["stop"] > 0)
        m["_keys"] = keys
        return m

    # ---- logging
    def log_step(self, m: dict[str, Any]) -> None:
        keys = m.pop("_keys")
        m.pop("_stop")
        all_keys = [None] * self.world if self.cfg.train.step_log else None
        if self.cfg.train.step_log:
            self.dist.all_gather_object(all_keys, keys)
        if self.rank != 0:
            return
        if self.step % self.cfg.train.log_every == 0 or self.step == 1:
            self.tracker.log_metrics(m, self.step)
            if "loss/total" in m:
                log.info("step %d/%d loss %.4f (rank %.4f lm %.4f) acc %.3f alpha %.2f lr %.2e %.1f samples/s",
                         self.step, self.cfg.train.max_steps, m["loss/total"], m["loss/rank"], m["loss/lm"],
                         m["train/accuracy"], m["alpha"], m["lr"], m["samples_per_s"])
        if self.cfg.train.step_log:
            rec = {"step": self.step, **{k: m.get(k) for k in ("loss/total", "loss/rank", "loss/lm", "train/accuracy",
                                                               "alpha", "lr", "grad_norm", "skipped_steps")},
                   "keys": all_keys}
            with open(self.out / "steps.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")

    # ---- checkpoint
    def save(self) -> Path:
        from jrm_dist import checkpoint as ck
        from jrm_dist.runguard import divergence

        t0 = time.perf_counter()
        finite, bad, norm = ck.weight_stats(self.engine.module, self.dev)
        if not finite:
            raise TrainingAborted(
                f"step {self.step}: the model weights are not finite ({'e.g. ' + bad + ' on this rank' if bad else 'on another rank'}); "
                f"not saving a checkpoint or export. The last good checkpoint: {self._last_sane_checkpoint()} "
                f"(lower optim.lr / optim.head_lr?)")
        diverged = divergence(norm, self.start_norm, self.cfg.train.divergence_factor)
        if diverged:
            raise TrainingAborted(
                f"step {self.step}: the weights diverged: {diverged}; not saving a checkpoint or export. The last "
                f"sane checkpoint: {self._last_sane_checkpoint()} (lower optim.lr / optim.head_lr, then resume "
                f"from it with --resume)")
        run_id = self.tracker.wait_run_id(60.0) if self.rank == 0 else None
        state = {"step": self.step, "world_size": self.world, "mlflow_run_id": run_id, "counters": self.counters,
                 "zero_stage": self.cfg.zero.stage, "lora": self.cfg.model.lora.r > 0,
                 "lora_alpha": self.cfg.model.lora.alpha, "lora_r": self.cfg.model.lora.r, "time": time.time(),
                 "frozen_from": self.frozen_from}
        path = ck.save(self.engine, self.out, self.step, rank=self.rank, loader_state=self.loader.state_dict(),
                       trainer_state=state, config_yaml=getattr(self, "config_yaml", ""), hf_files=self._hf_files,
                       keep_last=self.cfg.train.keep_last, fault_hook=self.faults.save_hook)
        if self.rank == 0:
            log.info("checkpoint %s (%.1fs)", path, time.perf_counter() - t0)
        self.saved_step = self.step
        return path

    def _last_sane_checkpoint(self) -> str:
        """Every checkpoint passed the finiteness and divergence checks when it was saved, so ``latest``
        names the last sane one."""
        from jrm_dist import checkpoint as ck

        latest = ck.ckpt_root(self.out) / ck.LATEST
        return str(latest.parent / latest.read_text().strip()) if latest.exists() else "none (nothing was saved)"

    def _hf_files(self, d: Path) -> None:
        """What jrm-export needs besides the weights: backbone config, processor files, head settings."""
        from jrm_dist.processing import JRM_CONFIG

        d.mkdir(parents=True, exist_ok=True)
        self.model.backbone.config.save_pretrained(str(d))
        self.processor.save_pretrained(str(d))
        jcfg = self.model.jrm_config()
        jcfg["processor"] = self.processor.settings()  # scoring/serving must encode inputs as training did
        # eval/serve compute P(A beats B) under the loss the head was trained with
        jcfg["loss"] = {"rank_mode": self.cfg.loss.rank_mode, "ties": self.cfg.loss.ties,
                        "tie_margin": self.cfg.loss.tie_margin}
        (d / JRM_CONFIG).write_text(json.dumps(jcfg, indent=2))

    # ---- eval
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Every rank scores its share of the eval shards (lockstep: equal batches per rank, ZeRO-3 safe);
        rank 0 gathers mu / sigma / features per candidate, dedupes padded repeats by key, and computes pairwise
        accuracy, the calibration of P(winner beats loser) on the decided pairs under ``loss.rank_mode``
        (+ reliability PNG) and the effective rank of the reward-token features (+ spectrum PNG)."""
        from jrm_dist.data.loader import StreamingLoader
        from jrm_dist.metrics import (calibration_metrics, effective_rank, rank_settings, reliability_bins,
                                      reliability_diagram, singular_values, win_probability)

        cfg = self.cfg
        loader = StreamingLoader.from_config(cfg.data, self.processor, rank=self.rank, world_size=self.world,
                                             shards=cfg.data.eval_shards, shuffle_shards=False)
        loader.dataset.shuffle_buffer = 1
        self.engine.eval()
        records = []
        for b in loader:
            keys = b["keys"]
            bd = _to_device(b, self.dev)
            bd["labels"] = None  # scoring only: the LM head is not needed
            out = self.engine(bd)
            mu = out["mu"].float().cpu()
            sigma = torch.exp(0.5 * out["log_var"].float()).cpu()
            feats = out["features"].float().cpu()
            gi = b["group_index"]
            for g, key in enumerate(keys):
                rows = (gi == g).nonzero().flatten()
                sel = [(int(w) - int(rows[0]), int(l) - int(rows[0]), bool(t))
                       for w, l, t in zip(b["win_idx"], b["lose_idx"], b["tie"]) if int(gi[w]) == g]
                records.append({"key": key, "mu": mu[rows].tolist(), "sigma": sigma[rows].tolist(),
                                "features": feats[rows], "pairs": sel})
        self.engine.train()
        gathered = [None] * self.world
        self.dist.all_gather_object(gathered, records)
        if self.rank != 0:
            return {}
        by_key = {}
        for part in gathered:
            for r in part:
                by_key.setdefault(r["key"], r)
        correct = decided = 0
        dec = [], [], [], []  # mu / sigma of winner and loser of each decided pair (human ties have no winner)
        for r in by_key.values():
            for w, l, t in r["pairs"]:
                if not t:
                    decided += 1
                    correct += int(r["mu"][w] > r["mu"][l])
                    for lst, v in zip(dec, (r["mu"][w], r["sigma"][w], r["mu"][l], r["sigma"][l])):
                        lst.append(v)
        mode, margin = rank_settings({"rank_mode": cfg.loss.rank_mode, "ties": cfg.loss.ties,
                                      "tie_margin": cfg.loss.tie_margin})
        p_win = win_probability(*dec, mode=mode, tie_margin=margin)
        outcome = torch.ones_like(p_win)  # oriented winner-first; the metrics do not depend on the orientation
        cal = calibration_metrics(p_win, outcome)
        feats = torch.cat([r["features"] for r in by_key.values()])
        metrics = {"eval/accuracy": correct / decided if decided else float("nan"),
                   "eval/effective_rank": effective_rank(feats), "eval/groups": float(len(by_key)),
                   **{f"eval/{k}": v for k, v in cal.items() if k != "n"}}
        ev = self.out / "eval"
        ev.mkdir(exist_ok=True)
        (ev / f"step_{self.step:08d}.json").write_text(json.dumps({
            "step": self.step, **metrics,
            "calibration": {"rank_mode": mode, "tie_margin": margin, "pairs": cal["n"],
                            "bins": reliability_bins(p_win, outcome)},
            "scores": {k: {"mu": r["mu"], "sigma": r["sigma"], "pairs": r["pairs"]}
                       for k, r in sorted(by_key.items())}}))
        png = ev / f"spectrum_step_{self.step:08d}.png"
        _spectrum_png(singular_values(feats).numpy(), png, f"step {self.step}: effective rank "
                      f"{metrics['eval/effective_rank']:.2f}")
        rel = reliability_diagram(p_win, outcome, ev / f"reliability_step_{self.step:08d}.png",
                                  title=f"step {self.step}: P(winner beats loser), {mode}")
        self.tracker.log_metrics(metrics, self.step)
        self.tracker.log_artifact(png, "eval")
        self.tracker.log_artifact(rel, "eval")
        log.info("eval step %d: accuracy %.3f, effective rank %.2f, ECE %.3f, log-lik %.3f over %d groups (%d pairs)",
                 self.step, metrics["eval/accuracy"], metrics["eval/effective_rank"], cal["ece"],
                 cal["log_likelihood"], len(by_key), cal["n"])
        return metrics

    # ---- main loop
    def fit(self) -> int:
        cfg = self.cfg
        self.build()
        last_saved = self.step if self.resume_from is not None else -1
        exit_code = 0
        final_eval: dict[str, float] = {}
        status = "FINISHED"
        skips_in_a_row = 0
        try:
            while self.step < cfg.train.max_steps:
                skipped_before = self.counters["skipped_steps"]
                m = self.train_step()
                if m is None:
                    log.info("data exhausted after %d epoch(s) at step %d", cfg.train.epochs, self.step)
                    break
                stop = m["_stop"] > 0
                self.log_step(m)
                self._check_corrupt_fraction(m)
                skips_in_a_row = skips_in_a_row + 1 if self.counters["skipped_steps"] > skipped_before else 0
                if skips_in_a_row >= cfg.train.max_consecutive_skips:  # agreed: skips are decided globally
                    raise TrainingAborted(
                        f"step {self.step}: {skips_in_a_row} steps in a row had a non-finite loss and were skipped "
                        f"(train.max_consecutive_skips={cfg.train.max_consecutive_skips}); stopping. Check "
                        f"loss.*, optim.lr and the data; after fixing it, resume from the last sane checkpoint: "
                        f"{self._last_sane_checkpoint()}")
                if self.faults.hit("kill", self.step):
                    log.error("JRM_FAULTS: SIGKILL after step %d", self.step)
                    os.kill(os.getpid(), signal.SIGKILL)
                if self.faults.hit("nan_weights", self.step):
                    log.error("JRM_FAULTS: NaN in this rank's weights after step %d", self.step)
                    p = next(self.engine.module.parameters())
                    with torch.no_grad():
                        (p.ds_tensor if hasattr(p, "ds_tensor") else p.data).view(-1)[0] = float("nan")
                if self.faults.hit("big_weights", self.step):
                    log.error("JRM_FAULTS: this rank's weights times 1e6 after step %d", self.step)
                    with torch.no_grad():
                        for p in self.engine.module.parameters():
                            (p.ds_tensor if hasattr(p, "ds_tensor") else p.data).mul_(1e6)
                if self.faults.hit("signal", self.step):
                    sig = getattr(signal, "SIG" + self.faults.hit("signal", self.step).removeprefix("SIG"))
                    os.kill(os.getpid(), sig)
                    # the flag is agreed on at the next step's all-reduce
                if stop:
                    self.save()
                    last_saved = self.step
                    if self.rank == 0:
                        (self.out / REQUEUE_MARKER).write_text(json.dumps(
                            {"step": self.step, "signal": signal.Signals(self.stop_signal).name
                             if self.stop_signal else "peer"}))
                    exit_code = REQUEUE_EXIT_CODE
                    status = "SCHEDULED"  # MLflow: the run goes on after the requeue
                    break
                if cfg.train.save_every and self.step % cfg.train.save_every == 0:
                    self.save()
                    last_saved = self.step
                if cfg.train.eval_every and cfg.data.eval_shards and self.step % cfg.train.eval_every == 0:
                    final_eval = self.evaluate()
            if exit_code == 0:
                if last_saved != self.step:
                    self.save()
                if cfg.data.eval_shards and not (cfg.train.eval_every and self.step % cfg.train.eval_every == 0):
                    final_eval = self.evaluate()
        except BaseException:
            status = "FAILED"
            raise
        finally:
            self._write_rank_info()
            if self.rank == 0 and status != "FAILED":
                self.tracker.log_metrics({"skipped_steps": float(self.counters["skipped_steps"])}, self.step)
            corrupt = None
            if status != "FAILED":
                corrupt = torch.tensor([float(self.loader.corrupt_samples)], device=self.dev)
                self.dist.all_reduce(corrupt)  # every rank's count (each rank reads its own records)
                self.dist.barrier()
            if self.rank == 0:
                if status == "FINISHED":
                    final = {"step": self.step, **self.counters, "corrupt_samples": int(corrupt.item()),
                             **final_eval}
                    (self.out / "final_metrics.json").write_text(json.dumps(final, indent=2))
                    self.tracker.log_artifact(self.out / "final_metrics.json")
                self.tracker.close(timeout=60.0, status=status if status != "SCHEDULED" else "")
        if exit_code == 0 and self.cfg.train.export:
            self.export()
        return exit_code

    def _write_rank_info(self) -> None:
        from jrm_dist.engine import optimizer_state_bytes

        d = self.out / "ranks"
        d.mkdir(exist_ok=True)
        info = {"rank": self.rank, "world_size": self.world, **self.pstats, "step": self.step,
                "optimizer_state_bytes": optimizer_state_bytes(self.engine), "peak_mem_mb": _peak_mem_mb(self.dev)}
        (d / f"rank_{self.rank:05d}.json").write_text(json.dumps(info, indent=2))

    def export(self) -> None:
        """Rank 0 consolidates the final checkpoint into <output_dir>/export (jrm-export's code)."""
        from jrm_dist.export import export_checkpoint

        self.dist.barrier()
        if self.rank == 0:
            out = export_checkpoint(self.out, self.out / "export")
            print(f"[jrm-train] consolidated HF export: {out}  "
                  f"(load with JointRewardModel.from_pretrained('{out}'))", flush=True)
        self.dist.barrier()


def _spectrum_png(s, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    s = s / max(s.sum(), 1e-12)
    ax.semilogy(range(1, len(s) + 1), s, marker=".")
    ax.set_xlabel("singular value index")
    ax.set_ylabel("normalised singular value")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jrm-train", description="JRM joint training on DeepSpeed (ZeRO-3 by default)")
    ap.add_argument("--config", required=True, help="YAML config (see configs/)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20 loss.alpha=0.3")
    ap.add_argument("--resume", default="auto",
                    help="auto (newest complete checkpoint in train.output_dir, if any), none, or a checkpoint path")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return ap


def main(argv: list[str] | None = None) -> int:
    from jrm_dist.config import ConfigError, load_config
    from jrm_dist.runguard import OutputDirBusy, die_with_launcher

    die_with_launcher()  # under torchrun: a rank must not outlive its agent (see jrm_dist.runguard)
    args = build_parser().parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"jrm-train: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # DeepSpeed 0.19 calls c10d collectives that torch 2.13 marks deprecated: one warning per call, per step.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+\W* is deprecated", category=FutureWarning)
    try:
        trainer = Trainer(cfg, resume=args.resume)
    except (OutputDirBusy, ConfigError) as e:  # a setting only checkable against the model (every rank agrees)
        print(f"jrm-train: error: {e}", file=sys.stderr, flush=True)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return 2
    try:
        code = trainer.fit()
    except ConfigError as e:  # a setting checked against the model as it is built (every rank agrees)
        print(f"jrm-train: error: {e}", file=sys.stderr, flush=True)
        code = 2
    except TrainingAborted as e:
        log.error("%s", e)
        print(f"jrm-train: error: {e}", file=sys.stderr, flush=True)
        code = ABORT_EXIT_CODE
        # Every abort is decided on agreed (all-reduced) numbers, so all ranks are here: leave together.
        # A rank that tore its process group down while a peer was still closing its run died of SIGABRT.
        torch.distributed.barrier()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())

"""The Learner: one rank's model, optimisers and passes over a pool, identical on every rank. No Ray.

A pass reads a ``Pool`` (dec_ray.data.pools) on the worker's device: batches are gathered and
normalised there; embeddings, pseudo-labels and sampler indices are device tensors; the batch loop
never waits for the host (its logged losses are summed on the device and read once per pass).
What a training pass minimises is a ``Stage`` (dec_ray.method.epoch).

Under data parallelism every rank must read the same model wherever the method reads it
(embedding passes, K-means, dev/test scoring, the kept best weights). DDP keeps the parameters
equal; BatchNorm's running statistics it only copies from rank 0 at each training forward, after
which each rank updates them with its own batch. ``Learner.sync_buffers`` therefore broadcasts
rank 0's buffers after every training pass (see README, "Distributed training").
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from dec_ray.config import Config
from dec_ray.data.normalization import Stats
from dec_ray.data.pools import Pool
from dec_ray.method.distributed import broadcast, gather_objects, gather_tensors, rank_seed, world
from dec_ray.method.kmeans import kmeans
from dec_ray.method.augment import spec_augment
from dec_ray.method.losses import ccc, ccc_loss, sentence_means
from dec_ray.method.models import functionals_dim, model_from_config
from dec_ray.method.recipe import optimisers, rate_factor, set_rates

if TYPE_CHECKING:
    from dec_ray.method.epoch import Stage

MIN_SENTENCES_PER_WORKER_BATCH = 2      # the CCC loss needs label variance within a batch


@dataclass
class Batch:
    """One training batch: normalised inputs, the chunk ids they came from, and their pool.
    ``share``: this rank's chunks over the global batch's, times the world size (1 when ranks hold
    equal parts): a loss that is a mean over this rank's chunks, weighted by it, has under DDP's
    averaging the gradient of the mean over the global batch."""
    x: torch.Tensor
    idx: torch.Tensor
    pool: Pool
    share: float = 1.0
    functionals: Optional[torch.Tensor] = None     # (sentences, D): model.functionals

    @property
    def labels(self) -> torch.Tensor:
        return self.pool.chunk_labels(self.idx)


def step_bounds(lengths: Sequence[int], global_batch: int, rank: int) -> List[int]:
    """Where this rank's draws end after each step of a pass: ``lengths`` are every rank's draws,
    ``global_batch`` the chunks of one step over all ranks. The pass makes the steps 1 rank makes
    over all the draws (``total // global_batch``, at least 1; the last partial batch is dropped,
    as on 1 rank), and every step takes from each rank its share of the global batch, in proportion
    to its draws: all ranks' draws are merged into one global order in which rank r's j-th draw
    stands at (j + 1/2) / lengths[r] (ties by rank: Webster's apportionment, which never takes a
    draw back as the position grows), and step s takes global positions [s * global_batch, (s + 1)
    * global_batch). So a rank's bound never goes back (on any number of ranks), the shares of a
    step add up to the global batch, no rank stops early and every draw is trained but the < 1
    batch that 1 rank drops too; a rank with few draws takes few chunks a step (possibly none).

    (Cumulative floors of each rank's share, ``proportional_share(position)``, add up too but go
    back by one for a middle rank on 3+ ranks: a step of -1 chunks.)"""
    lengths = [int(n) for n in lengths]
    total = sum(lengths)
    if total == 0:
        return [0]
    ends = np.array([min(total, (s + 1) * global_batch) for s in range(max(1, total // global_batch))])
    if lengths[rank] == total:                       # 1 rank, or the others have nothing
        return [0] + ends.tolist()
    position = np.concatenate([(np.arange(n) + 0.5) / n for n in lengths if n])
    owner = np.concatenate([np.full(n, r) for r, n in enumerate(lengths) if n])
    mine = np.cumsum(owner[np.argsort(position, kind="stable")] == rank)     # stable: ties by rank
    bounds = [0] + mine[ends - 1].tolist()
    assert all(b1 >= b0 for b0, b1 in zip(bounds, bounds[1:])) and bounds[-1] <= lengths[rank], bounds
    return bounds


def stage_total(stage: "Stage", parts: Dict[str, torch.Tensor], share: float) -> torch.Tensor:
    """The stage's losses summed, those that are means over this rank's chunks weighted by its
    ``Batch.share`` (a loss marked ``global_batch`` is a statistic of the global batch already)."""
    return sum(v if getattr(stage.losses[k], "global_batch", False) else share * v for k, v in parts.items())


def batch_sentences(n_train: int, workers: int, batch: int, min_steps: int) -> int:
    """The global batch (sentences): the configured one, shrunk when an epoch over ``n_train``
    Train sentences would make fewer than ``min_steps`` optimiser steps (0: never shrink). Never
    below 2 sentences per worker, and a multiple of ``workers`` so every rank gets the same share."""
    floor = MIN_SENTENCES_PER_WORKER_BATCH * workers
    if min_steps > 0 and n_train // max(batch, 1) < min_steps:
        batch = n_train // min_steps
    return max(floor, batch // workers * workers)


class Learner:
    """Model, optimisers and the stage routines, identical on every rank.

    The weights are initialised from ``train.seed`` alone (the same on every rank, and the same
    for any number of ranks); afterwards torch's global generator is re-seeded per rank, so
    dropout masks differ between ranks but are reproducible."""

    def __init__(self, cfg: Config, stats: Stats, device: torch.device, wrap=None):
        self.cfg, self.stats, self.device = cfg, stats, device
        rank, size = world()
        torch.manual_seed(cfg.train.seed)
        self.net = model_from_config(cfg).to(device)
        torch.manual_seed(rank_seed(cfg.train.seed, rank))
        self.model = wrap(self.net) if wrap else self.net      # DDP wrapper under Ray Train
        t = cfg.train
        self.regressor_params = list(self.net.regressor.parameters())
        reg_ids = {id(p) for p in self.regressor_params}
        top_ids = {id(p) for p in self.net.top.parameters()} if self.clusters else set()
        body = [p for p in self.net.parameters() if id(p) not in reg_ids | top_ids]
        # named for the official recipe (SGD, Adam); train.recipe=adamw makes both AdamW
        self.sgd, self.adam = optimisers(t, body, self.regressor_params)
        self.base_rates = [t.lr, t.lr_regressor]
        # where the rate schedule stands: the epoch (run_epoch sets it), the optimiser steps the
        # epoch plans over all its passes (``plan_epoch``) and those made so far
        self.epoch, self.planned_steps, self.steps_done = 0, 0, 0
        self.top_opt: Optional[torch.optim.Optimizer] = None
        # train.batch_sentences is the global batch; each rank takes its share of it
        self.batch_chunks = max(1, t.batch_sentences // size) * cfg.features.num_chunks
        self.amp = t.amp and device.type == "cuda"
        # called as on_batch(done, total) after each training batch (rank 0's progress line)
        self.on_batch: Optional[Callable[[int, int], None]] = None
        self.normalize = stats.feature_normalizer(device, cfg.model.input, cfg.model.norm)
        self.functionals = functionals_dim(cfg)          # values per sentence beside the chunks (0: none)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = t.cudnn_benchmark
            if t.channels_last:
                self.net.to(memory_format=torch.channels_last)

    @property
    def clusters(self) -> bool:
        return self.cfg.model.name == "deepemocluster"

    @property
    def sentence_head(self) -> bool:
        return self.cfg.model.head == "sentence"

    @property
    def unit(self) -> int:
        """Chunks a batch is counted in: 1, or a sentence's under the sentence head."""
        return self.cfg.features.num_chunks if self.sentence_head else 1

    def steps_of(self, chunks: int) -> int:
        """Optimiser steps of a pass over ``chunks`` draws of all ranks (counted in ``unit``s, as
        ``train`` counts them): the steps 1 rank makes (``step_bounds``)."""
        units = chunks // self.unit
        return max(1, units // (self.batch_chunks * world()[1] // self.unit)) if units > 0 else 0

    def plan_epoch(self, epoch: int, steps: int) -> None:
        """The epoch's optimiser steps over all its passes: the rate schedule advances by one
        ``1 / steps`` of an epoch per step, across the passes (one warm-up and one decay per run,
        not one per pass)."""
        self.epoch, self.planned_steps, self.steps_done = epoch, steps, 0

    def progress(self, pass_step: int, pass_steps: int) -> float:
        """Epochs into the run at this step (the schedule's clock). Without a plan (a pass called
        on its own), the pass is the epoch."""
        if self.planned_steps <= 0:
            return self.epoch + pass_step / max(pass_steps, 1)
        return self.epoch + min(self.steps_done / self.planned_steps, 1.0)

    def _forward(self, x: torch.Tensor, model: nn.Module, functionals: Optional[torch.Tensor] = None
                 ) -> Dict[str, torch.Tensor]:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            return model(x, functionals) if self.functionals else model(x)

    def _functionals(self, pool: Pool, idx: torch.Tensor, key: str = "pred") -> Optional[torch.Tensor]:
        """The batch's sentences' functionals (``model.functionals``); zeros (the Train mean) for a
        pool read without them, where no prediction is read (an embedding pass)."""
        if not self.functionals:
            return None
        f = pool.sentence_functionals(idx)
        if f is None:
            if key == "pred":
                raise ValueError("this model reads functionals beside its chunks, and the pool holds none")
            f = torch.zeros((len(idx) // self.unit, self.functionals), device=self.device)
        return f

    def sync_buffers(self) -> None:
        """Every rank takes rank 0's BatchNorm running statistics (what model.pt saves)."""
        if world()[1] == 1:
            return
        bufs = list(self.net.buffers())          # float running stats and int64 batch counters
        flat = torch.cat([b.detach().double().flatten() for b in bufs])
        broadcast(flat, src=0)                    # one collective (float64 holds the counters exactly)
        for b, v in zip(bufs, torch.split(flat, [b.numel() for b in bufs])):
            b.copy_(v.view_as(b))                 # copy_ casts back to the buffer's dtype and device

    # --- clustering ---
    @torch.no_grad()
    def _eval_pass(self, pool: Pool, key: str, width: int) -> torch.Tensor:
        """One output of every chunk of the pool, in order, in eval mode (never shuffled), into a
        float32 tensor on the device."""
        self.net.eval()
        out = torch.empty((pool.n_chunks, width), dtype=torch.float32, device=self.device)
        order = torch.arange(pool.n_chunks, device=pool.chunks.device)
        for s in range(0, pool.n_chunks, self.batch_chunks):
            x = pool.chunk_inputs(order[s:s + self.batch_chunks], self.normalize)
            f = self._functionals(pool, order[s:s + self.batch_chunks], key)
            out[s:s + len(x)] = self._forward(x, self.net, f)[key].float()
        return out

    def embed(self, pool: Pool) -> torch.Tensor:
        """Chunk-level embeddings of the whole pool (the clustering input), on the device."""
        return self._eval_pass(pool, "embedding", self.cfg.model.hidden_dim)

    def cluster(self, embeddings: torch.Tensor, seed: int):
        """Distributed K-means of the embeddings -> per-chunk pseudo-labels (on the device)."""
        c = self.cfg.cluster
        return kmeans(embeddings, c.k, niter=c.niter, seed=seed, pca_dim=c.pca_dim, l2=c.l2_normalize,
                      assign=c.assign, threads=c.faiss_threads, balance=c.balance, sinkhorn_eps=c.sinkhorn_eps)

    def pseudo_labels(self, pool: Pool, seed: int):
        """A fresh eval-mode embedding pass, then ``cluster``."""
        return self.cluster(self.embed(pool), seed)

    def reset_top(self, seed: int) -> None:
        """Fresh top layer (same on all ranks) and a fresh SGD for it."""
        self.net.reset_top(torch.Generator().manual_seed(seed))
        self.top_opt = torch.optim.SGD(self.net.top.parameters(), lr=self.cfg.train.lr_top)

    # --- one pass over sampled chunks ---
    def train(self, pool: Pool, indices, stage: "Stage") -> Dict[str, float]:
        """One pass over ``indices`` (chunk ids of this pool, in the sampler's order) minimising the
        stage's losses; the regressor's Adam and the top layer's SGD step only when the stage says
        so. Every rank makes the same number of steps and trains all its draws (``step_bounds``).
        Returns the mean of each loss over this rank's steps and the chunks it trained on."""
        self.model.train()
        indices = torch.as_tensor(indices, device=self.device)
        at_pool = indices.to(pool.chunks.device)               # one copy per stage, none per batch
        size = world()[1]
        lengths = gather_tensors(torch.tensor([len(indices)], dtype=torch.int64))[:, 0].tolist()
        unit = self.unit                    # the sentence head's batches hold whole sentences
        bounds = [unit * b for b in step_bounds([n // unit for n in lengths], self.batch_chunks * size // unit,
                                                world()[0])]
        step_total = min(self.batch_chunks * size, sum(lengths))     # every step's chunks over all ranks
        n_batches = len(bounds) - 1
        sums: Dict[str, torch.Tensor] = {}
        counted: Dict[str, int] = {}
        trained = 0
        views = None
        if stage.augment:                   # one stream per rank, reproducible (seeded with the stage)
            views = torch.Generator(device=self.device)
            views.manual_seed(int(torch.randint(0, 2 ** 62, (1,)).item()))
        for b in range(n_batches):
            set_rates((self.sgd, self.adam), self.base_rates, rate_factor(self.cfg.train, self.progress(b, n_batches)))
            rows = slice(bounds[b], bounds[b + 1])
            mine = bounds[b + 1] - bounds[b]
            assert mine >= 0, f"rank {world()[0]}: step {b} of {n_batches} would train {mine} chunks"
            if mine:
                x = pool.chunk_inputs(at_pool[rows], self.normalize)
                batch = Batch(spec_augment(x, views) if views is not None else x, indices[rows], pool,
                              share=size * mine / step_total, functionals=self._functionals(pool, indices[rows]))
                out = self._forward(batch.x, self.model, batch.functionals)
                parts = {name: loss(out, batch) for name, loss in stage.losses.items()}
                total = stage_total(stage, parts, batch.share)
            else:                           # no chunks here this step: the collectives still need us
                out, total, parts, saved = self._empty_step(pool, stage)
            # DDP needs every parameter in the graph: outputs no loss reads join with weight zero
            total = total + sum(0.0 * v.float().sum() for v in out.values())
            optimisers = [self.sgd] + ([self.adam] if stage.regressor else []) + \
                ([self.top_opt] if stage.top and self.top_opt is not None else [])
            for opt in (self.sgd, self.adam, self.top_opt):
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
            total.backward()
            for opt in optimisers:          # a stage without the emotion loss never steps Adam on zeros
                opt.step()
            if not mine:                    # the stand-in chunk leaves no trace in BatchNorm's statistics
                with torch.no_grad():
                    for buf, v in zip(self.net.buffers(), saved):
                        buf.copy_(v)
            trained += mine
            self.steps_done += 1
            if self.on_batch is not None:
                self.on_batch(b + 1, n_batches)
            for k, v in parts.items():                       # summed on the device: no sync per batch
                sums[k] = sums.get(k, 0.0) + v.detach().float()
                counted[k] = counted.get(k, 0) + 1
        self.sync_buffers()
        return {**{k: float(v) / counted[k] for k, v in sums.items()}, "chunks": trained}

    def _empty_step(self, pool: Pool, stage: "Stage"):
        """A step in which this rank holds no chunks: a forward of one all-zero chunk (sentence) so that DDP's
        gradient all-reduce has this rank's zeros, and the global-batch losses on no rows (their
        sums join the all-reduce as zeros). Returns (outputs, loss, logged parts: none, the
        BatchNorm buffers to restore after the step)."""
        saved = [b.detach().clone() for b in self.net.buffers()]
        shape = (self.unit, self.cfg.features.chunk_frames, self.cfg.features.n_mels)
        f = torch.zeros((1, self.functionals), device=self.device) if self.functionals else None
        out = self._forward(torch.zeros(shape, device=self.device), self.model, f)
        none = Batch(torch.zeros((0,) + shape[1:], device=self.device),
                     torch.zeros(0, dtype=torch.int64, device=self.device), pool, share=0.0)
        total = sum(loss({k: v[:0] for k, v in out.items()}, none) for loss in stage.losses.values()
                    if getattr(loss, "global_batch", False))
        return out, total if torch.is_tensor(total) else torch.zeros((), device=self.device), {}, saved

    # --- evaluation ---
    @torch.no_grad()
    def predict(self, pool: Pool) -> np.ndarray:
        """Chunk predictions (n*C, A) of the pool, z-scored scale."""
        return self._eval_pass(pool, "pred", len(self.cfg.model.attributes)).cpu().numpy()

    def evaluate(self, pool: Pool, prefix: str) -> Dict:
        """Each rank predicts its own part of an evaluation split (possibly none of it); the
        results are gathered everywhere. A collective: every rank calls it."""
        parts = gather_objects((pool.row_ids, self.predict(pool), pool.labels.cpu().numpy()))
        row_ids = np.concatenate([p[0] for p in parts])
        chunk_pred = np.concatenate([p[1] for p in parts])
        labels = np.concatenate([p[2] for p in parts])
        c = self.cfg.features.num_chunks
        chunk_ids = np.repeat(row_ids, c)
        loss = float(ccc_loss(torch.from_numpy(chunk_pred), torch.from_numpy(np.repeat(labels, c, axis=0))))
        ids, sent_pred = sentence_means(chunk_pred, chunk_ids)
        order = np.argsort(row_ids)
        gold = labels[order]
        attrs = self.cfg.model.attributes
        pred_dn = self.stats.denormalize_labels(sent_pred, attrs)
        gold_dn = self.stats.denormalize_labels(gold, attrs)
        metrics = {f"{prefix}_loss": loss}
        for j, a in enumerate(attrs):
            metrics[f"{prefix}_ccc_{a}"] = ccc(pred_dn[:, j], gold_dn[:, j])
        metrics[f"{prefix}_ccc"] = float(np.mean([metrics[f"{prefix}_ccc_{a}"] for a in attrs]))
        return {"metrics": metrics, "row_ids": ids, "pred": pred_dn, "gold": gold_dn}

    # --- state ---
    def state(self) -> dict:
        return {"model": self.net.state_dict(), "sgd": self.sgd.state_dict(), "adam": self.adam.state_dict()}

    def load_state(self, state: dict) -> None:
        self.net.load_state_dict(state["model"])
        self.sgd.load_state_dict(state["sgd"])
        self.adam.load_state_dict(state["adam"])

    def model_copy(self) -> dict:
        return copy.deepcopy({k: v.detach().cpu() for k, v in self.net.state_dict().items()})

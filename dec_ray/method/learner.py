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
from typing import TYPE_CHECKING, Callable, Dict, Optional

import numpy as np
import torch
from torch import nn

from dec_ray.config import Config
from dec_ray.data.normalization import Stats
from dec_ray.data.pools import Pool
from dec_ray.method.distributed import broadcast, gather_objects, min_over_ranks, rank_seed, world
from dec_ray.method.kmeans import kmeans
from dec_ray.method.augment import spec_augment
from dec_ray.method.losses import ccc, ccc_loss, sentence_means
from dec_ray.method.models import model_from_config

if TYPE_CHECKING:
    from dec_ray.method.epoch import Stage

MIN_SENTENCES_PER_WORKER_BATCH = 2      # the CCC loss needs label variance within a batch


@dataclass
class Batch:
    """One training batch: normalised inputs, the chunk ids they came from, and their pool."""
    x: torch.Tensor
    idx: torch.Tensor
    pool: Pool

    @property
    def labels(self) -> torch.Tensor:
        return self.pool.chunk_labels(self.idx)


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
        self.sgd = torch.optim.SGD(body, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        self.adam = torch.optim.Adam(self.regressor_params, lr=t.lr_regressor)
        self.top_opt: Optional[torch.optim.Optimizer] = None
        # train.batch_sentences is the global batch; each rank takes its share of it
        self.batch_chunks = max(1, t.batch_sentences // size) * cfg.features.num_chunks
        self.amp = t.amp and device.type == "cuda"
        # called as on_batch(done, total) after each training batch (rank 0's progress line)
        self.on_batch: Optional[Callable[[int, int], None]] = None
        self.normalize = stats.feature_normalizer(device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = t.cudnn_benchmark
            if t.channels_last:
                self.net.to(memory_format=torch.channels_last)

    @property
    def clusters(self) -> bool:
        return self.cfg.model.name == "deepemocluster"

    def _forward(self, x: torch.Tensor, model: nn.Module) -> Dict[str, torch.Tensor]:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            return model(x)

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
            out[s:s + len(x)] = self._forward(x, self.net)[key].float()
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
        so. Returns the mean of each loss and the number of chunks trained on."""
        self.model.train()
        indices = torch.as_tensor(indices, device=self.device)
        at_pool = indices.to(pool.chunks.device)               # one copy per stage, none per batch
        n_batches = min_over_ranks(len(indices) // self.batch_chunks if len(indices) >= self.batch_chunks
                                   else int(len(indices) > 0))
        sums: Dict[str, torch.Tensor] = {}
        trained = 0
        views = None
        if stage.augment:                   # one stream per rank, reproducible (seeded with the stage)
            views = torch.Generator(device=self.device)
            views.manual_seed(int(torch.randint(0, 2 ** 62, (1,)).item()))
        for b in range(n_batches):
            rows = slice(b * self.batch_chunks, (b + 1) * self.batch_chunks)
            x = pool.chunk_inputs(at_pool[rows], self.normalize)
            batch = Batch(spec_augment(x, views) if views is not None else x, indices[rows], pool)
            out = self._forward(batch.x, self.model)
            parts = {name: loss(out, batch) for name, loss in stage.losses.items()}
            total = sum(parts.values())
            if not stage.regressor:
                # DDP needs every parameter in the graph: the regressor joins with weight zero
                total = total + 0.0 * out["pred"].sum()
            optimisers = [self.sgd] + ([self.adam] if stage.regressor else []) + \
                ([self.top_opt] if stage.top and self.top_opt is not None else [])
            for opt in (self.sgd, self.adam, self.top_opt):
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
            total.backward()
            for opt in optimisers:          # a stage without the emotion loss never steps Adam on zeros
                opt.step()
            trained += len(batch.idx)
            if self.on_batch is not None:
                self.on_batch(b + 1, n_batches)
            for k, v in parts.items():                       # summed on the device: no sync per batch
                sums[k] = sums.get(k, 0.0) + v.detach().float()
        self.sync_buffers()
        return {**{k: float(v) / max(n_batches, 1) for k, v in sums.items()}, "chunks": trained}

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

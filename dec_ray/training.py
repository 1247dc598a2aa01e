"""The DeepEmoCluster epoch, its baselines and the epoch loop, in torch (+ torch.distributed). No Ray.

A worker holds its shard of each dataset as a ``Pool`` (dec_ray.pools) and trains on chunks. The
whole epoch stays on the worker's device: batches are gathered and normalised there, embeddings,
K-means, pseudo-labels and sampler indices are device tensors, and the batch loop never waits for
the host (its logged losses are summed on the device and read once per stage).

Epoch (deepemocluster, cluster.mode=separate):
  (a) embed the unlabeled pool (eval mode) -> distributed K-means -> fresh top layer ->
      uniform-over-clusters sample -> cross-entropy; the regressor has no loss and is not stepped
  (b) the same on the labeled Train pool, then CCC-loss + lambda * CE through the whole model
  (c) validation on dev: chunk-level CCC loss and sentence-level CCC

Under data parallelism every rank must read the same model wherever the method reads it
(embedding passes, K-means, dev/test scoring, the kept best weights). DDP keeps the parameters
equal; BatchNorm's running statistics it only copies from rank 0 at each training forward, after
which each rank updates them with its own batch. ``Learner.sync_buffers`` therefore broadcasts
rank 0's buffers after every training stage (see README, "Distributed training").
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import numpy as np
import torch
from torch import nn

from dec_ray.clustering import kmeans
from dec_ray.config import Config
from dec_ray.distributed import (broadcast, gather_objects, min_over_ranks, rank_seed, sum_over_ranks,
                                 world)
from dec_ray.losses import ccc, ccc_loss, sentence_means, vae_kl
from dec_ray.models import model_from_config
from dec_ray.normalization import Stats
from dec_ray.pools import Pool
from dec_ray.sampler import uniform_cluster_indices

MIN_SENTENCES_PER_WORKER_BATCH = 2      # the CCC loss needs label variance within a batch


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
                      assign=c.assign, threads=c.faiss_threads)

    def pseudo_labels(self, pool: Pool, seed: int):
        """A fresh eval-mode embedding pass, then ``cluster``."""
        return self.cluster(self.embed(pool), seed)

    def reset_top(self, seed: int) -> None:
        """Fresh top layer (same on all ranks) and a fresh SGD for it."""
        self.net.reset_top(torch.Generator().manual_seed(seed))
        self.top_opt = torch.optim.SGD(self.net.top.parameters(), lr=self.cfg.train.lr_top)

    # --- one pass over sampled chunks ---
    def train_stage(self, pool: Pool, indices, pseudo: Optional[torch.Tensor] = None,
                    supervised: bool = False) -> Dict[str, float]:
        """Train on ``indices`` (chunk ids of this pool). CE on ``pseudo`` when given; CCC when
        ``supervised``; reconstruction for ae/vae. The regressor steps only when supervised.
        Returns the mean of each loss and the number of chunks trained on."""
        self.model.train()
        t = self.cfg.train
        indices = torch.as_tensor(indices, device=self.device)
        at_pool = indices.to(pool.chunks.device)               # one copy per stage, none per batch
        if pseudo is not None:
            pseudo = torch.as_tensor(pseudo, device=self.device)
        n_batches = min_over_ranks(len(indices) // self.batch_chunks if len(indices) >= self.batch_chunks
                                   else int(len(indices) > 0))
        sums: Dict[str, torch.Tensor] = {}
        trained = 0
        for b in range(n_batches):
            batch = slice(b * self.batch_chunks, (b + 1) * self.batch_chunks)
            idx = indices[batch]
            x = pool.chunk_inputs(at_pool[batch], self.normalize)
            out = self._forward(x, self.model)
            trained += len(idx)
            parts: Dict[str, torch.Tensor] = {}
            if pseudo is not None:
                ce = nn.functional.cross_entropy(out["logits"].float(), pseudo[idx])
                parts["ce"] = ce * (t.lambda_ce if supervised else 1.0)
            if supervised:
                parts["ccc"] = ccc_loss(out["pred"], pool.chunk_labels(idx))
            if "recon" in out:
                rec = nn.functional.mse_loss(out["recon"].float(), x)
                if "mu" in out:
                    rec = rec + self.cfg.model.latent_beta * vae_kl(out["mu"].float(), out["logvar"].float())
                parts["recon"] = rec * (t.lambda_ce if supervised else 1.0)
            loss = sum(parts.values())
            if not supervised:
                # DDP needs every parameter in the graph: the regressor joins with weight zero
                loss = loss + 0.0 * out["pred"].sum()
            self.sgd.zero_grad(set_to_none=True)
            self.adam.zero_grad(set_to_none=True)
            if self.top_opt is not None:
                self.top_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.sgd.step()
            if pseudo is not None and self.top_opt is not None:
                self.top_opt.step()
            if supervised:      # unsupervised stages have no regression loss: no Adam step on zeros
                self.adam.step()
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


def _wait(device: torch.device) -> None:
    """Let queued GPU work finish before reading a clock (timings only; once per stage)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_epoch(learner: Learner, epoch: int, train: Pool, unlabeled: Optional[Pool]) -> Dict[str, float]:
    """One epoch of the configured model; returns its training losses, cluster statistics and the
    time of each step (``*_embed_s``, ``*_kmeans_s``, ``*train_s`` over ``*chunks`` chunks)."""
    cfg = learner.cfg
    rank, _ = world()
    seed = cfg.train.seed * 100_003 + epoch * 4
    logs: Dict[str, float] = {}
    has_unl = unlabeled is not None and sum_over_ranks(len(unlabeled.row_ids)) > 0

    def sample(n: int, s: int) -> torch.Tensor:
        g = torch.Generator(device=learner.device)
        g.manual_seed(rank_seed(s, rank))
        return torch.randperm(n, generator=g, device=learner.device)

    def train_on(name: str, pool: Pool, idx: torch.Tensor, pseudo=None, supervised: bool = False) -> None:
        t0 = time.perf_counter()
        out = learner.train_stage(pool, idx, pseudo, supervised=supervised)      # ends with a host read
        logs.update({f"{name}{k}": v for k, v in out.items()})
        logs[f"{name}train_s"] = time.perf_counter() - t0

    def cluster(name: str, pool: Pool, s: int):
        t0 = time.perf_counter()
        emb = learner.embed(pool)
        _wait(learner.device)
        t1 = time.perf_counter()
        res = learner.cluster(emb, s)
        t2 = time.perf_counter()
        logs.update({f"{name}_embed_s": t1 - t0, f"{name}_kmeans_s": t2 - t1, f"{name}_cluster_s": t2 - t0,
                     f"{name}_kmeans_obj": res.objective, f"{name}_nonempty": int((res.sizes > 0).sum())})
        learner.reset_top(s)
        return res.assignment, uniform_cluster_indices(res.assignment, seed=s, rank=rank)

    if cfg.model.name == "cnn":
        train_on("", train, sample(train.n_chunks, seed), supervised=True)
        return logs
    if cfg.model.name in ("ae", "vae"):
        if has_unl:
            train_on("unl_", unlabeled, sample(unlabeled.n_chunks, seed))
        train_on("", train, sample(train.n_chunks, seed + 1), supervised=True)
        return logs

    if cfg.cluster.mode == "joint" and has_unl:
        # one clustering over labeled + unlabeled; CE on all, CCC on the labeled chunks
        both = Pool.concat([train, unlabeled])
        assignment, idx = cluster("joint", both, seed)
        train_on("joint_unl_", both, idx[idx >= train.n_chunks], assignment)
        train_on("joint_", both, idx[idx < train.n_chunks], assignment, supervised=True)
        return logs
    if has_unl:
        assignment, idx = cluster("unlabeled", unlabeled, seed)
        train_on("unlabeled_", unlabeled, idx, assignment)
    assignment, idx = cluster("train", train, seed + 1)
    train_on("train_", train, idx, assignment, supervised=True)
    return logs


@dataclass
class LoopState:
    """What the epoch loop carries from epoch to epoch (and through a checkpoint)."""
    epoch: int = -1                       # last finished epoch
    best_loss: float = float("inf")
    best_epoch: int = -1
    bad_epochs: int = 0
    best_model: Optional[dict] = None
    finished: bool = False

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "best_loss": self.best_loss, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs, "best_model": self.best_model, "finished": self.finished}


def is_better(loss: float, best: float) -> bool:
    return math.isfinite(loss) and loss < best


def fit(learner: Learner, pools: Dict[str, Optional[Pool]], state: Optional[LoopState] = None,
        report: Optional[Callable[[Dict, LoopState], None]] = None) -> Dict:
    """The epoch loop: train, score dev, keep the best weights by dev loss, stop after
    ``train.patience`` epochs without improvement (0: run every epoch, as the official code), and
    finally score the best weights on dev and test. ``report(metrics, state)`` is called after each
    epoch (the Ray worker saves its checkpoint there). Every rank calls this; ``pools["test"]`` is
    None only when there is no test split at all. Returns the final metrics (``done == 1``) and the
    dev/test evaluations of the best weights."""
    cfg = learner.cfg
    state = state or LoopState()
    if state.best_model is None:
        state.best_model = learner.model_copy()
    report = report or (lambda metrics, st: None)
    for epoch in range(state.epoch + 1, cfg.train.epochs):
        t0 = time.time()
        logs = run_epoch(learner, epoch, pools["train"], pools.get("unlabeled"))
        ev = learner.evaluate(pools["dev"], "dev")["metrics"]
        state.epoch = epoch
        if is_better(ev["dev_loss"], state.best_loss):
            state.best_loss, state.best_epoch, state.bad_epochs = ev["dev_loss"], epoch, 0
            state.best_model = learner.model_copy()
        else:
            state.bad_epochs += 1
        report({"epoch": epoch, **logs, **ev, "best_dev_loss": state.best_loss, "best_epoch": state.best_epoch,
                "epoch_time_s": time.time() - t0, "done": 0}, state)
        if cfg.train.patience > 0 and state.bad_epochs >= cfg.train.patience:
            break

    learner.net.load_state_dict(state.best_model)
    final = {"epoch": max(state.epoch, 0), "best_epoch": state.best_epoch, "best_dev_loss": state.best_loss,
             "done": 1, "early_stopped": int(state.epoch + 1 < cfg.train.epochs)}
    evals = {"dev": learner.evaluate(pools["dev"], "dev")}
    if pools.get("test") is not None:
        evals["test"] = learner.evaluate(pools["test"], "test")
    for ev in evals.values():
        final.update(ev["metrics"])
    state.finished = True
    return {"metrics": final, "evals": evals}

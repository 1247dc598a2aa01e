"""The DeepEmoCluster epoch, its baselines and the epoch loop, in torch (+ torch.distributed). No Ray.

A worker holds its shard of each dataset as a ``Pool`` of sentences (raw float16 chunks + labels)
and trains on chunks: chunk index i is sentence i // C, chunk i % C, so pseudo-labels and sampler
draws are plain arrays indexed by chunk and stay aligned however the sampler shuffles.

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
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dec_ray.clustering import comm_device, kmeans
from dec_ray.config import Config
from dec_ray.losses import ccc, ccc_loss, sentence_means, vae_kl
from dec_ray.models import model_from_config
from dec_ray.normalization import Stats
from dec_ray.sampler import uniform_cluster_indices

MIN_SENTENCES_PER_WORKER_BATCH = 2      # the CCC loss needs label variance within a batch


@dataclass
class Pool:
    """One worker's sentences of one dataset, kept in memory as stored (float16 raw mel)."""
    chunks: np.ndarray          # (n, C, m, F)
    labels: np.ndarray          # (n, A) z-scored; NaN for unlabeled
    row_ids: np.ndarray         # (n,) global ids from ingest

    @property
    def n_chunks(self) -> int:
        return self.chunks.shape[0] * self.chunks.shape[1]

    def chunk_inputs(self, idx: np.ndarray, stats: Stats) -> np.ndarray:
        c = self.chunks.shape[1]
        return stats.normalize_features(self.chunks[idx // c, idx % c])

    def chunk_labels(self, idx: np.ndarray) -> np.ndarray:
        return self.labels[idx // self.chunks.shape[1]]

    @staticmethod
    def concat(pools: List["Pool"]) -> "Pool":
        pools = [p for p in pools if p is not None]
        return Pool(np.concatenate([p.chunks for p in pools]), np.concatenate([p.labels for p in pools]),
                    np.concatenate([p.row_ids for p in pools]))


def world() -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _reduce_int(n: int, op) -> int:
    if world()[1] == 1:
        return n
    t = torch.tensor([n], dtype=torch.int64, device=comm_device())
    dist.all_reduce(t, op=op)
    return int(t.item())


def min_over_ranks(n: int) -> int:
    return _reduce_int(n, dist.ReduceOp.MIN)


def sum_over_ranks(n: int) -> int:
    return _reduce_int(n, dist.ReduceOp.SUM)


def gather_objects(obj):
    """All ranks' objects, in rank order (just [obj] without a process group)."""
    rank, size = world()
    if size == 1:
        return [obj]
    out = [None] * size
    dist.all_gather_object(out, obj)
    return out


def rank_seed(seed: int, rank: int) -> int:
    """An independent, reproducible random stream per (seed, rank)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


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

    @property
    def clusters(self) -> bool:
        return self.cfg.model.name == "deepemocluster"

    def _forward(self, x: np.ndarray, model: nn.Module) -> Dict[str, torch.Tensor]:
        xt = torch.from_numpy(x).to(self.device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            return model(xt)

    def sync_buffers(self) -> None:
        """Every rank takes rank 0's BatchNorm running statistics (what model.pt saves)."""
        if world()[1] == 1:
            return
        bufs = list(self.net.buffers())          # float running stats and int64 batch counters
        flat = torch.cat([b.detach().double().flatten() for b in bufs]).to(comm_device())
        dist.broadcast(flat, src=0)               # one collective (float64 holds the counters exactly)
        for b, v in zip(bufs, torch.split(flat, [b.numel() for b in bufs])):
            b.copy_(v.view_as(b))                 # copy_ casts back to the buffer's dtype and device

    # --- clustering ---
    @torch.no_grad()
    def _eval_pass(self, pool: Pool, key: str, width: int) -> np.ndarray:
        """One output of every chunk of the pool, in order, in eval mode (never shuffled)."""
        self.net.eval()
        out = []
        for s in range(0, pool.n_chunks, self.batch_chunks):
            idx = np.arange(s, min(s + self.batch_chunks, pool.n_chunks))
            out.append(self._forward(pool.chunk_inputs(idx, self.stats), self.net)[key].float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, width), np.float32)

    def embed(self, pool: Pool) -> np.ndarray:
        """Chunk-level embeddings of the whole pool (the clustering input)."""
        return self._eval_pass(pool, "embedding", self.cfg.model.hidden_dim)

    def pseudo_labels(self, pool: Pool, seed: int):
        """A fresh eval-mode embedding pass -> distributed K-means -> per-chunk pseudo-labels."""
        c = self.cfg.cluster
        return kmeans(self.embed(pool), c.k, niter=c.niter, seed=seed, pca_dim=c.pca_dim, l2=c.l2_normalize,
                      use_gpu=self.device.type == "cuda", threads=c.faiss_threads)

    def reset_top(self, seed: int) -> None:
        """Fresh top layer (same on all ranks) and a fresh SGD for it."""
        self.net.reset_top(torch.Generator().manual_seed(seed))
        self.top_opt = torch.optim.SGD(self.net.top.parameters(), lr=self.cfg.train.lr_top)

    # --- one pass over sampled chunks ---
    def train_stage(self, pool: Pool, indices: np.ndarray, pseudo: Optional[np.ndarray] = None,
                    supervised: bool = False) -> Dict[str, float]:
        """Train on ``indices`` (chunk ids of this pool). CE on ``pseudo`` when given; CCC when
        ``supervised``; reconstruction for ae/vae. The regressor steps only when supervised."""
        self.model.train()
        t = self.cfg.train
        n_batches = min_over_ranks(len(indices) // self.batch_chunks if len(indices) >= self.batch_chunks
                                   else int(len(indices) > 0))
        sums: Dict[str, float] = {}
        for b in range(n_batches):
            idx = indices[b * self.batch_chunks:(b + 1) * self.batch_chunks]
            x = pool.chunk_inputs(idx, self.stats)
            out = self._forward(x, self.model)
            parts: Dict[str, torch.Tensor] = {}
            if pseudo is not None:
                target = torch.from_numpy(pseudo[idx]).to(self.device)
                ce = nn.functional.cross_entropy(out["logits"].float(), target)
                parts["ce"] = ce * (t.lambda_ce if supervised else 1.0)
            if supervised:
                y = torch.from_numpy(pool.chunk_labels(idx)).to(self.device)
                parts["ccc"] = ccc_loss(out["pred"], y)
            if "recon" in out:
                rec = nn.functional.mse_loss(out["recon"].float(), torch.from_numpy(x).to(self.device))
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
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
        self.sync_buffers()
        return {k: v / max(n_batches, 1) for k, v in sums.items()}

    # --- evaluation ---
    @torch.no_grad()
    def predict(self, pool: Pool) -> np.ndarray:
        """Chunk predictions (n*C, A) of the pool, z-scored scale."""
        return self._eval_pass(pool, "pred", len(self.cfg.model.attributes))

    def evaluate(self, pool: Pool, prefix: str) -> Dict:
        """Each rank predicts its own part of an evaluation split (possibly none of it); the
        results are gathered everywhere. A collective: every rank calls it."""
        parts = gather_objects((pool.row_ids, self.predict(pool), pool.labels))
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


def run_epoch(learner: Learner, epoch: int, train: Pool, unlabeled: Optional[Pool]) -> Dict[str, float]:
    """One epoch of the configured model; returns its training losses and cluster statistics."""
    cfg = learner.cfg
    rank, _ = world()
    seed = cfg.train.seed * 100_003 + epoch * 4
    logs: Dict[str, float] = {}
    has_unl = unlabeled is not None and sum_over_ranks(len(unlabeled.row_ids)) > 0

    def sample(n: int, s: int) -> np.ndarray:
        return np.random.default_rng([s, rank]).permutation(n)

    if cfg.model.name == "cnn":
        logs.update(learner.train_stage(train, sample(train.n_chunks, seed), supervised=True))
        return logs
    if cfg.model.name in ("ae", "vae"):
        if has_unl:
            logs.update({f"unl_{k}": v for k, v in
                         learner.train_stage(unlabeled, sample(unlabeled.n_chunks, seed)).items()})
        logs.update(learner.train_stage(train, sample(train.n_chunks, seed + 1), supervised=True))
        return logs

    def cluster(name: str, pool: Pool, s: int):
        t0 = time.perf_counter()
        res = learner.pseudo_labels(pool, s)
        logs[f"{name}_cluster_s"] = time.perf_counter() - t0          # embedding pass + K-means
        logs[f"{name}_kmeans_obj"] = res.objective
        logs[f"{name}_nonempty"] = int((res.sizes > 0).sum())
        learner.reset_top(s)
        return res.assignment, uniform_cluster_indices(res.assignment, seed=s, rank=rank)

    if cfg.cluster.mode == "joint" and has_unl:
        # one clustering over labeled + unlabeled; CE on all, CCC on the labeled chunks
        both = Pool.concat([train, unlabeled])
        assignment, idx = cluster("joint", both, seed)
        out_u = learner.train_stage(both, idx[idx >= train.n_chunks], assignment)
        out_l = learner.train_stage(both, idx[idx < train.n_chunks], assignment, supervised=True)
        logs.update({f"joint_unl_{k}": v for k, v in out_u.items()})
        logs.update({f"joint_{k}": v for k, v in out_l.items()})
        return logs
    if has_unl:
        assignment, idx = cluster("unlabeled", unlabeled, seed)
        logs.update({f"unlabeled_{k}": v for k, v in learner.train_stage(unlabeled, idx, assignment).items()})
    assignment, idx = cluster("train", train, seed + 1)
    logs.update({f"train_{k}": v for k, v in learner.train_stage(train, idx, assignment, supervised=True).items()})
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

"""One epoch of each model, composed of small steps. No Ray.

The steps (as swav's main_deepclusterv2.py has ``cluster_memory`` and ``train``):
  - ``cluster_pool``: a fresh eval-mode embedding pass -> distributed K-means -> a fresh top
    layer -> the uniform-over-clusters sample of chunk ids (pseudo-labels stay aligned with it)
  - a training pass (``Learner.train``) minimising a ``Stage``: which losses, and whether the
    regressor (Adam) and the fresh top layer step

DeepEmoCluster (cluster.mode=separate), as the paper's Fig. 1:
  (a) cluster the unlabeled pool, then ``PSEUDO_LABELS``: cross-entropy only; the regressor has
      no loss and is not stepped
  (b) cluster the labeled Train pool, then ``supervised``: CCC-loss + lambda * CE
The CNN baseline runs the supervised step alone. ``train.teacher`` adds a regression signal on the
pool: 1 - CCC against a linear reference's predictions, in stage (a) (the CNN: a pass of its own).
The auto-encoders a reconstruction step on the
unlabeled pool, then the supervised step with lambda * reconstruction.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
from torch import nn

from dec_ray.data.pools import Pool
from dec_ray.method.distributed import (all_reduce_differentiable, gather_tensors, proportional_share, rank_seed,
                                        sum_over_ranks, world)
from dec_ray.method.learner import Batch, Learner
from dec_ray.method.losses import ccc_loss, vae_kl
from dec_ray.method.sampler import uniform_cluster_indices

Loss = Callable[[Dict[str, torch.Tensor], Batch], torch.Tensor]


@dataclass
class Stage:
    """What a training pass minimises: named losses (weights included), and which optimisers
    beside the encoder's SGD step: the regressor's Adam, the fresh top layer's SGD."""
    losses: Dict[str, Loss]
    regressor: bool = False
    top: bool = False
    augment: bool = False             # SpecAugment views of the batch (method/augment.py)


# --- the loss terms ---
def emotion(out, batch: Batch) -> torch.Tensor:
    """1 - CCC over the global batch (every rank's share of it; see ``losses.ccc_torch``)."""
    return ccc_loss(out["pred"], batch.labels, reduce=all_reduce_differentiable)


emotion.global_batch = True     # a statistic of the global batch already: not weighted by the rank's share


def teacher(weight: float, columns: Optional[Sequence[int]] = None) -> Loss:
    """``train.teacher``: 1 - CCC against a reference's predictions, which the pool holds as its
    labels (service/train.py puts them there), times ``weight``; ``columns``: of those attributes only."""
    cols = slice(None) if columns is None else list(columns)

    def loss(out, batch: Batch) -> torch.Tensor:
        return weight * ccc_loss(out["pred"][:, cols], batch.labels[:, cols], reduce=all_reduce_differentiable)
    loss.global_batch = True
    return loss


def teacher_of(cfg) -> Optional[Loss]:
    """The run's teacher loss, or None without ``train.teacher``."""
    if cfg.train.teacher == "none" or cfg.train.teacher_weight <= 0:
        return None
    wanted = cfg.train.teacher_attributes
    columns = [cfg.model.attributes.index(a) for a in wanted] if wanted else None
    return teacher(cfg.train.teacher_weight, columns)


def pseudo_label_ce(pseudo: torch.Tensor, weight: float = 1.0) -> Loss:
    return lambda out, batch: weight * nn.functional.cross_entropy(out["logits"].float(), pseudo[batch.idx])


def reconstruction(beta: float, weight: float = 1.0) -> Loss:
    """Mean squared error per input element; for the VAE plus beta * KL on the same scale.

    A standard VAE minimises sum-over-elements reconstruction + beta * sum-over-latents KL per
    sample. Both are divided here by the elements per chunk (62 x 128), so beta weighs the KL as in
    that objective (a per-element mean beside a per-sample sum weighted it 7936 times too heavily,
    and every latent unit collapsed to the prior)."""
    def loss(out, batch: Batch) -> torch.Tensor:
        rec = nn.functional.mse_loss(out["recon"].float(), batch.x)
        if "mu" in out:                                     # the VAE's KL term
            per_element = beta / batch.x[0].numel()
            rec = rec + per_element * vae_kl(out["mu"].float(), out["logvar"].float())
        return weight * rec
    return loss


# --- the stages ---
def pseudo_labels_stage(pseudo: torch.Tensor, augment: bool = False, teacher_loss: Optional[Loss] = None) -> Stage:
    """Stage (a): cross-entropy on the pseudo-labels only (of augmented views, with ``augment``);
    with ``train.teacher``, plus the teacher's regression loss (and the regressor steps)."""
    if teacher_loss is not None:
        return Stage({"ce": pseudo_label_ce(pseudo), "teacher": teacher_loss}, regressor=True,
                     top=True, augment=augment)
    return Stage({"ce": pseudo_label_ce(pseudo)}, top=True, augment=augment)


def supervised_stage(lambda_: float, pseudo: Optional[torch.Tensor] = None,
                     recon_beta: Optional[float] = None) -> Stage:
    """Stage (b) and the baselines' supervised step: CCC-loss + lambda * (CE | reconstruction)."""
    losses: Dict[str, Loss] = {}
    if pseudo is not None:
        losses["ce"] = pseudo_label_ce(pseudo, lambda_)
    losses["ccc"] = emotion
    if recon_beta is not None:
        losses["recon"] = reconstruction(recon_beta, lambda_)
    return Stage(losses, regressor=True, top=pseudo is not None)


def _wait(device: torch.device) -> None:
    """Let queued GPU work finish before reading a clock (timings only; once per step)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Epoch:
    """One epoch's context: the seeds, the logs, and the two steps every model composes."""

    def __init__(self, learner: Learner, epoch: int):
        self.learner, self.epoch = learner, epoch
        self.rank = world()[0]
        self.seed = learner.cfg.train.seed * 100_003 + epoch * 4
        self.logs: Dict[str, float] = {}

    def plan(self, *pools: Optional[Pool]) -> None:
        """The passes this epoch will make, over these pools (None: no pass), in steps: the rate
        schedule's clock (``Learner.plan_epoch``). A collective: every rank calls it."""
        learner = self.learner
        learner.plan_epoch(self.epoch, sum(learner.steps_of(sum_over_ranks(p.n_chunks)) for p in pools if p is not None))

    def shuffled(self, pool: Pool, offset: int = 0) -> torch.Tensor:
        """All chunk ids of the pool in a random order (the baselines' sampler); under the sentence
        head, the sentences in a random order, each sentence's chunks together and in order."""
        g = torch.Generator(device=self.learner.device)
        g.manual_seed(rank_seed(self.seed + offset, self.rank))
        if not self.learner.sentence_head:
            return torch.randperm(pool.n_chunks, generator=g, device=self.learner.device)
        c = pool.chunks.shape[1]
        sentences = torch.randperm(pool.chunks.shape[0], generator=g, device=self.learner.device)
        return (sentences[:, None] * c + torch.arange(c, device=self.learner.device)).flatten()

    def cluster_pool(self, name: str, pool: Pool, offset: int = 0, sampler: str = "uniform"):
        """Embed -> K-means -> fresh top layer -> sampler (``uniform`` over the global clusters, or
        ``natural``: every chunk once, shuffled, as ``shuffled``, which the sentence head always
        uses); returns (pseudo-labels, chunk ids)."""
        learner, s = self.learner, self.seed + offset
        t0 = time.perf_counter()
        emb = learner.embed(pool)
        _wait(learner.device)
        t1 = time.perf_counter()
        res = learner.cluster(emb, s)
        t2 = time.perf_counter()
        self.logs.update({f"{name}_embed_s": t1 - t0, f"{name}_kmeans_s": t2 - t1, f"{name}_cluster_s": t2 - t0,
                          f"{name}_kmeans_obj": res.objective, f"{name}_nonempty": int((res.sizes > 0).sum())})
        learner.reset_top(s)
        if sampler == "natural" or learner.sentence_head:      # the sentence head reads whole sentences
            return res.assignment, self.shuffled(pool, offset)
        return res.assignment, uniform_cluster_indices(res.assignment, seed=s, rank=self.rank, k=len(res.sizes))

    def train(self, prefix: str, pool: Pool, indices: torch.Tensor, stage: Stage) -> None:
        t0 = time.perf_counter()
        out = self.learner.train(pool, indices, stage)           # ends with a host read
        self.logs.update({f"{prefix}{k}": v for k, v in out.items()})
        self.logs[f"{prefix}train_s"] = time.perf_counter() - t0


def has_rows(pool: Optional[Pool]) -> bool:
    """Whether any rank holds rows of this pool (a collective: every rank calls it)."""
    return pool is not None and sum_over_ranks(len(pool.row_ids)) > 0


def epoch_subset(pool: Pool, n: int, seed: int) -> Pool:
    """A seeded random ``n`` of the pool's sentences over all ranks (``train.unlabeled_per_epoch``):
    each rank draws its share in proportion to the rows it holds (cumulative floors, so the shares
    add up to ``n`` for any number of ranks), with its own stream. A collective."""
    rank, _ = world()
    counts = gather_tensors(torch.tensor([len(pool.row_ids)], dtype=torch.int64))[:, 0].tolist()
    total = sum(counts)
    if n <= 0 or n >= total:
        return pool
    mine = proportional_share(n, counts, rank)
    rows = np.sort(np.random.default_rng([seed, rank]).choice(counts[rank], mine, replace=False))
    return pool.take(torch.from_numpy(rows))


def pool_of_epoch(e: "Epoch", unlabeled: Optional[Pool]) -> Optional[Pool]:
    """The unlabeled sentences this epoch trains on: all, or a fresh seeded draw each epoch."""
    n = e.learner.cfg.train.unlabeled_per_epoch
    if n <= 0 or unlabeled is None:
        return unlabeled
    return epoch_subset(unlabeled, n, e.seed + 2)


def deepemocluster_epoch(e: Epoch, train: Pool, unlabeled: Optional[Pool]) -> None:
    cfg = e.learner.cfg
    lam = cfg.train.lambda_ce
    unlabeled = pool_of_epoch(e, unlabeled)
    if cfg.cluster.mode == "joint" and has_rows(unlabeled):
        # one clustering over labeled + unlabeled; CE on all, CCC on the labeled chunks
        both = Pool.concat([train, unlabeled])
        e.plan(both)                    # its two passes split it: their steps are this plan's, +-1
        pseudo, idx = e.cluster_pool("joint", both)
        e.train("joint_unl_", both, idx[idx >= train.n_chunks], pseudo_labels_stage(pseudo))
        e.train("joint_", both, idx[idx < train.n_chunks], supervised_stage(lam, pseudo))
        return
    pool_only = e.epoch < cfg.train.warmup_epochs
    pool = unlabeled if has_rows(unlabeled) else None
    e.plan(pool, None if pool is not None and pool_only else train)
    if pool is not None:
        pseudo, idx = e.cluster_pool("unlabeled", unlabeled)
        e.train("unlabeled_", unlabeled, idx, pseudo_labels_stage(pseudo, cfg.train.augment_pool, teacher_of(cfg)))
        if pool_only:                   # warm-up (train.warmup_epochs): the pool alone
            return
    pseudo, idx = e.cluster_pool("train", train, offset=1, sampler=cfg.cluster.labeled_sampler)
    e.train("train_", train, idx, supervised_stage(lam, pseudo))


def cnn_epoch(e: Epoch, train: Pool, unlabeled: Optional[Pool]) -> None:
    """The supervised step; with ``train.teacher``, first a pass distilling it on the pool."""
    cfg = e.learner.cfg
    unlabeled = pool_of_epoch(e, unlabeled)
    distil = teacher_of(cfg)
    pool = unlabeled if distil is not None and has_rows(unlabeled) else None
    e.plan(pool, train)
    if pool is not None:
        e.train("unlabeled_", unlabeled, e.shuffled(unlabeled, offset=2), Stage({"teacher": distil}, regressor=True))
    e.train("", train, e.shuffled(train), supervised_stage(cfg.train.lambda_ce))


def autoencoder_epoch(e: Epoch, train: Pool, unlabeled: Optional[Pool]) -> None:
    cfg = e.learner.cfg
    beta = cfg.model.latent_beta
    unlabeled = pool_of_epoch(e, unlabeled)
    pool = unlabeled if has_rows(unlabeled) else None
    e.plan(pool, train)
    if pool is not None:
        e.train("unl_", unlabeled, e.shuffled(unlabeled), Stage({"recon": reconstruction(beta)}))
    e.train("", train, e.shuffled(train, offset=1), supervised_stage(cfg.train.lambda_ce, recon_beta=beta))


EPOCHS = {"deepemocluster": deepemocluster_epoch, "cnn": cnn_epoch, "ae": autoencoder_epoch, "vae": autoencoder_epoch}


def run_epoch(learner: Learner, epoch: int, train: Pool, unlabeled: Optional[Pool]) -> Dict[str, float]:
    """One epoch of the configured model; returns its training losses, cluster statistics and the
    time of each step (``*_embed_s``, ``*_kmeans_s``, ``*train_s`` over ``*chunks`` chunks)."""
    e = Epoch(learner, epoch)
    learner.plan_epoch(epoch, 0)         # each epoch function plans its passes (Epoch.plan)
    EPOCHS[learner.cfg.model.name](e, train, unlabeled)
    return e.logs

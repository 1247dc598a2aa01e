"""The DeepEmoCluster method, no Ray: models, losses, K-means, the pseudo-label sampler, the
torch.distributed helpers, the epoch (its stages) and the epoch loop."""

"""dec_ray: DeepEmoCluster (Lin, Sridhar, Busso, ICASSP 2021) as a distributed training service on Ray.

Method modules (no Ray): audio, features, normalization, corpus, synth, models, losses,
clustering, sampler. Ray layer on top: ingest (Ray Data), trainer (Ray Train), tuner (Ray Tune).
"""
__version__ = "0.1.0"


def __getattr__(name):
    """``dec_ray.predict(run, audio)`` and ``dec_ray.Predictor`` without importing torch at start-up."""
    if name in ("predict", "Predictor"):
        from dec_ray import inference
        return getattr(inference, name)
    raise AttributeError(name)

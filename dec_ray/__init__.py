"""dec_ray: DeepEmoCluster (Lin, Sridhar, Busso, ICASSP 2021) as a distributed training service on Ray.

Packages: ``data`` and ``method`` know nothing of Ray (tests/test_layout.py keeps it so);
``service`` is the Ray layer on top (Ray Data ingest, Ray Train, Ray Tune, batch prediction, the
experiment job); ``report`` turns finished runs into predictions, evaluations and analyses.
``cli``, ``config`` (every default) and ``demo`` sit at the top.
"""
__version__ = "0.1.0"


def __getattr__(name):
    """``dec_ray.predict(run, audio)`` and ``dec_ray.Predictor`` without importing torch at start-up."""
    if name in ("predict", "Predictor"):
        from dec_ray.report import inference
        return getattr(inference, name)
    raise AttributeError(name)

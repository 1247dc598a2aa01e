"""The Ray layer, thin on top of data and method: which cluster, ingest (Ray Data), training (Ray
Train), search (Ray Tune), batch prediction and the experiment job."""

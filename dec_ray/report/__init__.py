"""What a finished run gives back: inference, the paper's evaluation protocol, cluster analysis,
the linear reference, plots and the experiment report."""

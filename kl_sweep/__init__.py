"""kl-sweep: forward and reverse KL fits of one Gaussian to a two-component mixture, at scale."""

__version__ = "0.1.0"

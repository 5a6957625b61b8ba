"""GraphAF (Shi et al. 2020): flow-based autoregressive generation of molecular graphs."""

"""PointFlow (Yang et al. 2019): 3-D point-cloud generation with a two-level continuous normalizing flow."""

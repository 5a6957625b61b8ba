"""VideoFlow (Kumar et al. 2020): conditional video prediction with a multi-scale Glow and a latent dynamics prior."""

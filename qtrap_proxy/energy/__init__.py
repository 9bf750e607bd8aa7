"""Energy: meters, attribution of measured GPU energy to requests, and the sampler that drives them."""

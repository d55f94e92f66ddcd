"""beit-jax: BEiT pretraining (masked image modeling over visual tokens) in JAX/Flax."""

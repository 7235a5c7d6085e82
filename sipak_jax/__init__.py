"""sipak-jax: cervical-cell classification on SIPaKMeD with JAX/Flax."""

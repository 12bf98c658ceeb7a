"""The train state: everything a training step reads and writes, as one pytree."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """step: int32 []; params: full model params {'image_encoder', 'prompt_encoder',
    'mask_decoder'}; opt_state: the optimizer's state; rng: uint32 [2] raw key data (the base
    key; step k uses fold_in(rng, k))."""

    step: jax.Array
    params: Any
    opt_state: optax.OptState
    rng: jax.Array

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=jax.random.key_data(jax.random.key(seed)),
        )

    def step_key(self) -> jax.Array:
        """The PRNG key of the current step: fold_in(base key, step)."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)

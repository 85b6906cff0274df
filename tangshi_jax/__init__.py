"""tangshi-jax: a character-level recurrent model of Tang poems in JAX.

The pipeline, one module a stage: corpus (poems.txt from the chinese-poetry package) ->
data (parsing, vocabulary, buckets) -> model (Flax cells scanned over time) -> train
(jitted steps, Orbax checkpoints) -> sample (jitted step-wise sampler).
"""

__version__ = "0.1.0"

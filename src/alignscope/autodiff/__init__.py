"""How one block's Jacobian is obtained: Jacobian rows by batched vector-Jacobian products, the linearized
block operator, vmap-batchable backward formulas, and products with a constant KV cache."""

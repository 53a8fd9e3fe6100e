"""The model's structure as data, the plan, and the algebra of computational invariance."""

"""Reading and writing: models, data, weights piece by piece, and output safety."""

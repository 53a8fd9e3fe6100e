"""Output formats: the slicegpt folder, the stock (plain) architecture and DeciLM, each with its writer."""

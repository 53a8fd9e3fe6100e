"""Code shipped inside output folders (torch + transformers only; imports nothing of slicelm)."""

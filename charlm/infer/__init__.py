"""Text from a network: sampling (temperature, top-k, top-p, stop strings) and beam search."""

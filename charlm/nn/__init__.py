"""The network: the cell registry and its equations, the RNN stack with Zaremba dropout, the one-step stepper."""

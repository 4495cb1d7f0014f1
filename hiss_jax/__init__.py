"""HiSS: hierarchical state space models for sensor sequence-to-sequence prediction."""

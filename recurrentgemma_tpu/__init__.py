"""Griffin, Hawk and RecurrentGemma pretraining, TPU first."""

"""ml_collections config files: `python train.py --config configs/<family>.py[:arg]`."""

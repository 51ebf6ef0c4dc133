"""What a run differentiates: models (built-in and the user's) and dataset slices."""

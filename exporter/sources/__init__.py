"""Source clients: each reads one backend of one estate and returns plain model data."""

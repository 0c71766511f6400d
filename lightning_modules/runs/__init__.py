"""The library side of every script in experiments/: each script parses its config, calls one of these and writes."""

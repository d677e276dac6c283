"""Measuring what a plan costs on a device: the device probe (probe.py), interleaved timing (timing.py), and
`profile`, which times an artifact's or a source's variants and the runner around them (profile.py)."""

"""The reference-model lab: the trained reference model and its scenes, the attribute classifier, quality
evaluation, and the study / tune / samples commands built on them. The lab imports the compiler core; the core
never imports the lab."""

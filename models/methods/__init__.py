"""Scoring methods, one per module, behind one interface (models.methods.base.ScoringMethod); a detector composes
one of them (models.image_detector). Installed: ``spade``, ``segmenter``, ``spade+segmenter`` (brain_mri) and
``padim`` (chest_xray). Methods no shipped model uses live in the repository's experiments/ folder."""

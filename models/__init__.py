"""Anomaly detectors (brain MRI, chest X-ray), backbones, training and evaluation.

Never imports networking or the job database.
"""
